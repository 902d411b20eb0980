"""Pictures of matches: the drawing's geometry (where a point is drawn) and its size."""

from PIL import Image

from sd4match.viz import MAX_ASPECT, contact_sheet, draw_matches, draw_points

GREY = (128, 128, 128)


def test_a_strip_is_drawn_within_the_aspect_cap_and_points_land_where_they_are():
    """A 4000 x 20 source beside a 400 x 300 target: drawn at most MAX_ASPECT heights wide
    (before, the side-by-side picture was 98,884 pixels wide), the marks at their places."""
    src, trg = Image.new("RGB", (4000, 20), GREY), Image.new("RGB", (400, 300), GREY)
    m = [{"name": "", "source": [2000.0, 10.0], "target": [200.0, 150.0], "score": 0.5}]
    out = draw_matches(src, trg, src.size, trg.size, m, height=480, gap=8)
    a_w, a_h = round(MAX_ASPECT * 480), round(20 * MAX_ASPECT * 480 / 4000)  # 1440 x 7
    b_w = 640  # 400 x 300 at height 480
    assert out.width == a_w + 8 + b_w and out.height >= 480  # the legend adds rows below
    assert out.getpixel((a_w // 2, a_h // 2)) != GREY  # the source mark at (2000, 10) -> (720, 3.5)
    assert out.getpixel((a_w + 8 + b_w // 2, 240)) != GREY  # the target mark at (200, 150) -> (320, 240) in its panel
    assert out.getpixel((a_w // 2, 300)) == (255, 255, 255)  # below the short strip: background, nothing stretched into it


def test_a_tall_picture_keeps_its_height_and_points_scale_by_their_own_axis():
    img = Image.new("RGB", (60, 900), GREY)
    out = draw_points(img, img.size, [{"name": "", "target": [30.0, 450.0], "score": 1.0}], height=300)
    assert out.size == (20, 300)
    assert out.getpixel((10, 150)) != GREY and out.getpixel((10, 20)) == GREY


def test_a_point_that_failed_its_check_is_a_ring_the_picture_seen_through_it():
    """``"reliable": false``: a ring in the point's colour around the picture's own pixels; a
    reliable point (or one without the key) is a filled dot of that colour."""
    from sd4match.viz import confidence_colour

    img = Image.new("RGB", (300, 300), GREY)
    pts = [{"name": "", "target": [75.0, 150.0], "score": 1.0, "reliable": False}, {"name": "", "target": [225.0, 150.0], "score": 1.0}]
    out = draw_points(img, img.size, pts, height=300)
    r, green = 300 // 60, confidence_colour(1.0, 0.0, 1.0)
    assert out.getpixel((75, 150)) == GREY and out.getpixel((225, 150)) == green
    assert green in [out.getpixel((75 + d, 150)) for d in range(1, r + 1)]  # the ring, in the point's colour
    assert out.getpixel((75 + r + 6, 150)) == GREY  # nothing beyond it
    # matches: both ends of one that failed are rings (the line runs through them)
    src = Image.new("RGB", (300, 300), GREY)
    ms = [{"name": "", "source": [150.0, 60.0], "target": [150.0, 60.0], "score": 1.0, "reliable": False},
          {"name": "", "source": [150.0, 240.0], "target": [150.0, 240.0], "score": 0.0}]
    out = draw_matches(src, src, src.size, src.size, ms, height=600, gap=8)  # dots of radius 5; a line 2 pixels wide
    assert out.getpixel((300, 120 - 2)) == GREY and out.getpixel((608 + 300, 120 - 2)) == GREY  # beside the line, inside the ring
    assert out.getpixel((300, 480 - 2)) != GREY and out.getpixel((608 + 300, 480 - 2)) != GREY
    plain = draw_matches(src, src, src.size, src.size, [{**m, "reliable": True} for m in ms], height=600, gap=8)
    assert out.height == plain.height and plain.getpixel((300, 120 - 2)) != GREY


def test_contact_sheet_rows_as_tall_as_their_pictures_and_captions_inside():
    caption = "a caption far wider than its narrow picture, " * 2
    tiles = [("a strip", Image.new("RGB", (4000, 20), GREY)), (caption, Image.new("RGB", (10, 300), GREY))]
    sheet = contact_sheet(tiles, tile_height=100, columns=1, pad=8)
    # the strip is drawn 300 wide (not 20,000); the caption, wider than that, widens the sheet to fit it
    assert 300 + 2 * 8 < sheet.width < 1000
    assert sheet.getpixel((sheet.width - 9, 3)) == (255, 255, 255)  # beside the strip, inside the sheet: background
    assert sheet.height < 2 * (100 + 12 + 4 + 8) + 8  # the strip's row is as tall as the strip (2 pixels), not 100


def test_errors_are_drawn_where_the_points_are_coloured_by_their_verdict():
    """``draw_errors``: the prediction judged correct is a green dot where it was predicted,
    the wrong one red, each joined to its ground truth; the source's points on the left."""
    from sd4match.viz import RIGHT, WRONG, draw_errors

    src, trg = Image.new("RGB", (200, 100), (0, 0, 0)), Image.new("RGB", (100, 50), (0, 0, 0))
    out = draw_errors(src, trg, (200, 100), (100, 50), [[20, 20], [180, 80]], [[30, 20], [40, 30]], [[32, 21], [80, 40]], [True, False],
                      height=100, gap=8)
    assert out.size == (200 + 8 + 200, 100)  # the target drawn at twice its pixels
    x0 = 208
    assert out.getpixel((x0 + 64, 42)) == RIGHT and out.getpixel((x0 + 160, 80)) == WRONG  # the dots, at 2x
    assert out.getpixel((x0 + 120, 70)) == WRONG  # on the line from (80, 60) to (160, 80): the error
    assert out.getpixel((20, 20)) == (255, 255, 255)  # the source's point 0, a white dot
    assert out.getpixel((x0 + 100, 20)) == (0, 0, 0)  # away from every mark: the picture


def test_training_curves_are_the_logged_numbers_with_a_running_mean_and_the_first_best():
    """What curves.png draws: 120 logged steps give a window of 2 (120 // 50) and the mean
    of each two neighbours; the best validation is the first of two equal ones (the step
    best/ holds, as keep_if_best keeps a score only when it is higher); a run that logged
    no step draws nothing."""
    import numpy as np

    from sd4match.viz import plot_training, training_curves

    records = [{"step": s, "loss": float(s % 7), "pairs_per_s": 3.0} for s in range(1, 121)]
    for s, v in ((40, 0.2), (80, 0.5), (120, 0.5)):
        records[s - 1]["val_pck@0.1"] = v
    c = training_curves(records)
    assert c["window"] == 2 and list(c["steps"][:3]) == [1, 2, 3]
    np.testing.assert_allclose(c["mean"][:6], [1.5, 2.5, 3.5, 4.5, 5.5, 3.0])  # (1+2)/2, (2+3)/2, ..., (6+0)/2
    assert len(c["mean"]) == 119 and list(c["val_steps"]) == [40, 80, 120] and c["best"] == 1
    assert training_curves([{"step": 1, "val_pck@0.1": 0.3}]) is None
    assert training_curves(records[:10])["window"] == 1
    assert plot_training([], "/nonexistent/never.png") is None
