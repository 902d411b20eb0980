"""`sd4match match` / `transfer` on real PF-Willow photos with a tiny random SD, and robust image input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import fixture_dir
from sd4match.cli import main
from sd4match.errors import Sd4MatchError
from sd4match.testing import tiny_sd
from sd4match.usermatch import Matcher, check_points, named_points, open_image, parse_points, run_match, run_transfer

MODEL_ARGS = ["--resolution", "64", "--ensemble", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def featurizer(tiny):
    from sd4match.features import load_featurizer

    return load_featurizer(str(tiny), resolution=64, ensemble=1)


@pytest.fixture
def willow_pair(willow_root):
    d = willow_root / "PF-dataset" / "car(G)"
    return d / "Cars_006a.png", d / "Cars_007a.png"


def _cell_centre_pixels(featurizer, size, cells):
    import torch

    return featurizer.cell_map(size).cell_to_pixel(torch.tensor(cells, dtype=torch.float32)).numpy().round(2)


def test_match_cli_writes_json_and_picture(tmp_path, tiny, willow_pair):
    a, b = willow_pair
    out = tmp_path / "m"
    assert main(["match", str(a), str(b), "--points", "10,20; 150.5,100", "--model", str(tiny), *MODEL_ARGS, "--out", str(out)]) == 0
    res = json.loads((out / "matches.json").read_text())
    assert res["source"]["size"] == [300, 200] and res["target"]["size"] == [300, 225]
    assert [m["name"] for m in res["matches"]] == ["p0", "p1"]
    assert [m["source"] for m in res["matches"]] == [[10.0, 20.0], [150.5, 100.0]]
    for m in res["matches"]:
        assert 0 <= m["target"][0] <= 300 and 0 <= m["target"][1] <= 225 and -1 <= m["score"] <= 1
    assert res["settings"]["model"]["model"] == str(tiny.resolve()) and res["settings"]["rule"] == "kernel-softargmax"
    png = Image.open(out / "matches.png")
    # both pictures at height 480, side by side with an 8-pixel gap: 720 + 8 + 640, and a 30-pixel score legend below
    assert png.size == (720 + 8 + 640, 480 + 30)
    arr = np.asarray(png.convert("RGB")).astype(float)[:480]
    assert arr.std() > 20  # not blank
    # the left half is photo A: its pixels equal A resized (away from the drawn points)
    left = np.asarray(Image.open(a).convert("RGB").resize((720, 480), Image.Resampling.BICUBIC)).astype(float)
    assert np.median(np.abs(arr[:, :720] - left)) < 1.0


def test_match_marks_the_matches_that_fail_the_cycle_check(tmp_path, featurizer, willow_pair):
    """``match --max-cycle``: each match's "reliable" is its cycle <= the threshold, with the
    threshold recorded; the matches themselves are those of a run without it."""
    a, b = willow_pair
    pts = [("p0", (10.0, 20.0)), ("p1", (150.5, 100.0)), ("p2", (250.0, 150.0)), ("p3", (60.0, 180.0))]
    plain = run_match(Matcher(featurizer), a, b, tmp_path / "all", points=pts)
    cycles = sorted(m["cycle"] for m in plain["matches"])
    cut = cycles[1]
    assert cycles[0] <= cut < cycles[-1]
    res = run_match(Matcher(featurizer), a, b, tmp_path / "m", points=pts, max_cycle=cut)
    assert res["max_cycle"] == cut and "max_cycle" not in plain
    assert [{k: v for k, v in m.items() if k != "reliable"} for m in res["matches"]] == plain["matches"]
    assert [m["reliable"] for m in res["matches"]] == [m["cycle"] <= cut for m in plain["matches"]]
    assert json.loads((tmp_path / "m" / "matches.json").read_text())["matches"] == res["matches"]
    with pytest.raises(Sd4MatchError, match="above 0"):
        run_match(Matcher(featurizer), a, b, tmp_path / "z", points=pts, max_cycle=0.0)
    assert not (tmp_path / "z").exists()


def test_self_match_returns_the_same_points_in_original_pixels(tmp_path, featurizer):
    """Matching an image to itself with nn: each cell-centre point comes back exactly, also when
    a large picture is downscaled before the model (coordinates stay in original pixels)."""
    big = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(small).resize((5000, 3000), Image.Resampling.BICUBIC).save(big, quality=90)
    img = open_image(big)
    assert img.size == (5000, 3000) and img.image.size == (2048, 1229)
    pts = _cell_centre_pixels(featurizer, img.size, [[0, 0], [3, 2], [7, 7], [5, 1]])
    m = Matcher(featurizer, "empty", rule="nn")
    out = m.match_points(img, img, [(f"p{i}", tuple(p)) for i, p in enumerate(pts)])
    assert [o["target"] for o in out] == [pytest.approx(list(map(float, p)), abs=0.006) for p in pts]
    assert all(o["score"] == pytest.approx(1.0, abs=1e-4) for o in out)


def test_points_in_every_form_a_user_writes_give_the_same_matches(featurizer, willow_pair):
    """match_points takes named pairs, a dict, unnamed (x, y) pairs, an (N, 2) array or tensor
    (named p0, p1, ... as on the command line): the same points give the same matches; a point
    that is not two finite numbers is named in one line."""
    import torch

    m = Matcher(featurizer, "empty", rule="nn")
    a, b = open_image(willow_pair[0]), open_image(willow_pair[1])
    xy = [(10.0, 20.0), (150.5, 100.0)]
    named = m.match_points(a, b, [("p0", xy[0]), ("p1", xy[1])])
    assert [r["name"] for r in named] == ["p0", "p1"] and [r["source"] for r in named] == [list(p) for p in xy]
    for form in (xy, [list(p) for p in xy], np.array(xy), torch.tensor(xy), {"p0": xy[0], "p1": xy[1]}):
        assert m.match_points(a, b, form) == named
    with pytest.raises(Sd4MatchError, match=r"^point 'eye' is \(1, 2, 3\), not \(x, y\)$"):
        m.match_points(a, b, [("eye", (1, 2, 3))])
    with pytest.raises(Sd4MatchError, match=r"^point p0 \(nan, 2\) is not a position: its coordinates must be finite numbers$"):
        m.match_points(a, b, [(float("nan"), 2.0)])
    with pytest.raises(Sd4MatchError, match=r"^point query \(301, 5\) lies outside .*Cars_006a.png \(300x200 pixels\)$"):
        m.similarity(a, b, (301, 5))
    assert m.similarity(a, b, np.array(xy[1])).shape == featurizer.grid_size[::-1]


def test_pictures_in_every_form_a_user_holds_give_the_same_matches(featurizer, willow_pair):
    """Matcher takes what open_image returns, a path, a PIL image or a uint8 array (before,
    anything but open_image's result ended in AttributeError: no attribute 'name'); a picture
    in memory larger than max_side is downscaled for the model and keeps its own pixels for
    coordinates."""
    from sd4match.usermatch import as_user_image

    m = Matcher(featurizer, "empty", rule="nn")
    a, b = open_image(willow_pair[0]), open_image(willow_pair[1])
    xy = [(10.0, 20.0), (150.5, 100.0)]
    want = m.match_points(a, b, xy)
    pil = [Image.open(p) for p in willow_pair]
    for fa, fb in [(str(willow_pair[0]), willow_pair[1]), tuple(pil), tuple(np.asarray(im.convert("RGB")) for im in pil)]:
        assert m.match_points(fa, fb, xy) == want
        np.testing.assert_array_equal(m.similarity(fa, fb, xy[0]), m.similarity(a, b, xy[0]))
    assert m.auto_points(pil[0], pil[1]) == m.auto_points(a, b)
    np.testing.assert_array_equal(m.dense(pil[0], str(willow_pair[1]))["source_xy"], m.dense(a, b)["source_xy"])
    big = as_user_image(Image.new("RGB", (6000, 1500), (1, 2, 3)), max_side=1000)
    assert big.size == (6000, 1500) and big.image.size == (1000, 250)
    with pytest.raises(Sd4MatchError, match=r"^a picture is a path, a PIL image, a uint8 array or what open_image returns, not a int$"):
        m.match_points(3, b, xy)
    with pytest.raises(Sd4MatchError, match=r"^image is 1x1 pixels, too small to match$"):
        m.match_points(Image.new("RGB", (1, 1)), b, [(0.5, 0.5)])


def test_auto_points_and_dense_on_self(tmp_path, featurizer, willow_pair):
    a = open_image(willow_pair[0])
    m = Matcher(featurizer, "empty", rule="nn")
    pts = m.auto_points(a, a, max_points=7)
    assert len(pts) == 7  # every cell is its own mutual nearest neighbour
    res = run_match(m, willow_pair[0], willow_pair[0], tmp_path / "d", dense=True, max_points=5)
    assert res["points_from"] == "mutual-nn" and len(res["matches"]) == 5
    assert all(x["source"] == x["target"] for x in res["matches"])
    assert res["dense"]["mutual_fraction"] == 1.0
    with np.load(tmp_path / "d" / "dense.npz", allow_pickle=False) as z:
        assert z["source_xy"].shape == (8, 8, 2) and z["score"].shape == (8, 8)
    warped = np.asarray(Image.open(tmp_path / "d" / "warped.png")).astype(float)
    orig = np.asarray(a.image).astype(float)
    assert warped.shape[1:] == orig.shape[1:] and warped.shape[0] > orig.shape[0]  # the picture, then its caption
    warped = warped[: orig.shape[0]]
    # identity flow: inside the outermost half cells the warp reproduces the picture
    mx, my = 300 // 16 + 1, 200 // 16 + 1
    assert np.abs(warped[my:-my, mx:-mx] - orig[my:-my, mx:-mx]).mean() < 1.0
    conf = Image.open(tmp_path / "d" / "confidence.png")
    assert conf.size[0] == 300 and conf.size[1] > 200 + 30  # the picture, its colour bar, its caption
    # the two pictures' maps in one PCA: a picture matched with itself is coloured alike, cell for cell
    from sd4match.viz import feature_pca, pca_colours

    pca = np.asarray(Image.open(tmp_path / "d" / "pca.png").convert("RGB"))
    w = round(300 * 256 / 200)  # each picture 256 rows tall, its PCA beside it: A, A's PCA, B, B's PCA
    tile_a, tile_b = pca[8:8 + 256, 8 + w + 8:8 + 2 * w + 8], pca[8:8 + 256, 8 + 3 * (w + 8):8 + 4 * w + 24]
    np.testing.assert_array_equal(tile_a, tile_b)
    want = pca_colours(feature_pca([f[0] for f in m.features(a, a)])[0])[0]
    assert tuple(tile_a[256 * 5 // 8 + 10, w * 3 // 8 + 10]) == tuple(want[5, 3])  # inside cell (row 5, column 3) of the 8 x 8 grid
    assert res["dense"]["files"] == ["warped.png", "confidence.png", "pca.png", "dense.npz"]


def test_transfer_three_targets(tmp_path, tiny, willow_pair, willow_root):
    targets = tmp_path / "targets"
    targets.mkdir()
    files = sorted((willow_root / "PF-dataset" / "duck(S)").glob("*.png"))[:3]
    for f in files:
        (targets / f.name).write_bytes(f.read_bytes())
    pts = tmp_path / "points.json"
    pts.write_text(json.dumps({"front wheel": [70, 150], "roof": [150, 40]}))
    out = tmp_path / "t"
    assert main(["transfer", "--source", str(willow_pair[0]), "--points", str(pts), "--targets", str(targets), "--model", str(tiny), *MODEL_ARGS,
                 "--out", str(out), "--no-progress"]) == 0
    docs = sorted(d for d in out.glob("*.json") if d.name != "coco.json")
    assert [d.stem for d in docs] == [f.stem for f in files]
    for d, f in zip(docs, files):
        doc = json.loads(d.read_text())
        assert [p["name"] for p in doc["points"]] == ["front wheel", "roof"]
        w, h = Image.open(f).size
        assert doc["target"]["size"] == [w, h] and all(0 <= p["x"] <= w and 0 <= p["y"] <= h for p in doc["points"])
    sheet = Image.open(out / "sheet.png")
    assert sheet.width > 3 * 240 and np.asarray(sheet.convert("L")).std() > 20
    # coco.json: the same points as COCO keypoints, laid out as the AP-10K fixture's COCO file
    coco = json.loads((out / "coco.json").read_text())
    ref = json.loads((willow_root.parent / "ap-10k" / "test_ap10k.json").read_text())
    assert set(coco) >= {"images", "annotations", "categories"}
    assert set(ref["images"][0]) - {"license", "background"} <= set(coco["images"][0])
    assert set(ref["annotations"][0]) <= set(coco["annotations"][0]) and set(ref["categories"][0]) <= set(coco["categories"][0])
    assert coco["categories"] == [{"id": 1, "name": "object", "supercategory": "object", "keypoints": ["front wheel", "roof"], "skeleton": []}]
    for im, ann, d, f in zip(coco["images"], coco["annotations"], docs, files):
        doc = json.loads(d.read_text())
        assert im["file_name"] == f.name and [im["width"], im["height"]] == list(Image.open(f).size) and ann["image_id"] == im["id"]
        pts = [(p["x"], p["y"]) for p in doc["points"]]
        assert ann["keypoints"] == [v for x, y in pts for v in (x, y, 2)] and ann["num_keypoints"] == 2
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        assert ann["bbox"] == pytest.approx([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
        assert ann["sd4match_scores"] == [p["score"] for p in doc["points"]] and ann["sd4match_cycles"] == [p["cycle"] for p in doc["points"]]


@pytest.fixture
def extractions(featurizer, monkeypatch):
    """One entry per picture whose features were extracted during the test."""
    calls = []
    real = type(featurizer).forward

    def counting(self, images, **kw):
        calls.extend([1] * (len(images) if images is not None else kw["posteriors"][0].shape[0]))
        return real(self, images, **kw)

    monkeypatch.setattr(type(featurizer), "forward", counting)
    return calls


def _targets(folder, willow_root, n):
    folder.mkdir()
    for f in sorted((willow_root / "PF-dataset" / "car(S)").glob("*.png"))[:n]:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_transfer_extracts_each_image_once(tmp_path, featurizer, willow_pair, willow_root, extractions):
    calls = extractions
    targets = _targets(tmp_path / "targets", willow_root, 3)
    run_transfer(Matcher(featurizer), willow_pair[0], [("a", (10.0, 10.0)), ("b", (20.0, 30.0))], targets, tmp_path / "o", progress=False)
    assert calls == [1, 1, 1, 1]  # the source once, each target once


def test_every_target_gets_its_own_json_whatever_its_name(tmp_path, featurizer, willow_pair, willow_root):
    """a/x.jpg and a__x.jpg both made a__x_jpg.json, the second replacing the first; a target
    named coco.jpg would have replaced coco.json. Now each target has its own file."""
    src = sorted((willow_root / "PF-dataset" / "car(S)").glob("*.png"))
    targets = tmp_path / "targets"
    (targets / "a").mkdir(parents=True)
    rels = ("a/x.png", "a__x.png", "coco.png", "skipped.png", "x.png")
    for rel, f in zip(rels, src):
        (targets / rel).write_bytes(f.read_bytes())
    written = run_transfer(Matcher(featurizer), willow_pair[0], [("a", (10.0, 10.0))], targets, tmp_path / "o", progress=False)
    assert sorted(p.name for p in written) == ["a__x_png.json", "a__x_png_2.json", "coco_png.json", "skipped_png.json", "x.json"]
    assert sorted(json.loads(p.read_text())["target"]["path"] for p in written) == sorted(str(targets / r) for r in rels)
    assert len(json.loads((tmp_path / "o" / "coco.json").read_text())["images"]) == 5


def test_a_transfer_sheet_is_paged_each_page_with_the_source(tmp_path, featurizer, willow_pair, willow_root):
    """Over sheet_targets targets the sheet goes on pages (one sheet of a thousand targets
    was ~90,000 px tall, which no viewer opens): 5 targets at 2 a page are sheet.png,
    sheet-2.png, sheet-3.png, the last with the source and one target; a second run of 2
    targets removes the pages the first wrote (one run's files in a folder)."""
    targets = _targets(tmp_path / "targets", willow_root, 5)
    out = tmp_path / "o"
    run_transfer(Matcher(featurizer), willow_pair[0], [("a", (10.0, 10.0))], targets, out, progress=False, sheet_targets=2)
    assert sorted(p.name for p in out.glob("sheet*.png")) == ["sheet-2.png", "sheet-3.png", "sheet.png"]
    full, last = Image.open(out / "sheet.png"), Image.open(out / "sheet-3.png")
    assert last.width < full.width  # two tiles, not three
    # the source's tile is the same at the top left of every page
    w = round(300 * 320 / 200)
    tile = lambda im: np.asarray(im.convert("RGB"))[8:8 + 320, 8:8 + w]
    np.testing.assert_array_equal(tile(full), tile(last))
    with pytest.raises(Sd4MatchError, match="at least one target"):
        run_transfer(Matcher(featurizer), willow_pair[0], [("a", (10.0, 10.0))], targets, out, progress=False, sheet_targets=0)
    for f in sorted(targets.glob("*.png"))[2:]:
        f.unlink()
    run_transfer(Matcher(featurizer), willow_pair[0], [("a", (10.0, 10.0))], targets, out, progress=False, sheet_targets=2)
    assert sorted(p.name for p in out.glob("sheet*.png")) == ["sheet.png"]


def test_transfer_into_a_folder_inside_its_targets_never_reads_its_own_output(tmp_path, featurizer, willow_pair, willow_root, extractions):
    """--out inside --targets: a second run transfers onto the same 3 pictures, not onto the
    first run's sheet.png (before: a fourth target, and an out__sheet.json)."""
    targets = _targets(tmp_path / "targets", willow_root, 3)
    for _ in range(2):
        run_transfer(Matcher(featurizer), willow_pair[0], [("a", (10.0, 10.0))], targets, targets / "out", progress=False)
        assert sorted(p.name for p in (targets / "out").iterdir() if not p.name.startswith(".")) == sorted(
            [f"{p.stem}.json" for p in targets.glob("*.png")] + ["coco.json", "sheet.png"])


def test_coco_keypoints_leave_points_that_fail_the_cycle_check_unlabelled():
    """``max_cycle``: a point whose cycle exceeds it is COCO's "not labelled" [0, 0, 0], outside
    num_keypoints and the box; its score and cycle stay listed (values by hand)."""
    from sd4match.usermatch import coco_keypoints

    ms = [{"target": [10.0, 20.0], "score": 0.9, "cycle": 0.01}, {"target": [50.0, 5.0], "score": 0.4, "cycle": 0.3},
          {"target": [30.0, 60.0], "score": 0.8, "cycle": 0.05}]
    found = [("a.png", (100, 80), ms), ("b.png", (90, 70), [ms[1]])]
    every = coco_keypoints(found, ["p", "q", "r"], "cat")["annotations"][0]
    assert every["keypoints"] == [10.0, 20.0, 2, 50.0, 5.0, 2, 30.0, 60.0, 2] and every["bbox"] == [10.0, 5.0, 40.0, 55.0]
    a, b = coco_keypoints(found, ["p", "q", "r"], "cat", max_cycle=0.05)["annotations"]
    assert a["keypoints"] == [10.0, 20.0, 2, 0, 0, 0, 30.0, 60.0, 2] and a["num_keypoints"] == 2  # 0.05 itself passes
    assert a["bbox"] == [10.0, 20.0, 20.0, 40.0] and a["area"] == 800.0
    assert a["sd4match_scores"] == [0.9, 0.4, 0.8] and a["sd4match_cycles"] == [0.01, 0.3, 0.05]
    assert b["keypoints"] == [0, 0, 0] and b["num_keypoints"] == 0 and b["bbox"] == [0.0, 0.0, 0.0, 0.0] and b["area"] == 0.0


def test_transfer_marks_points_that_fail_the_cycle_check(tmp_path, tiny, willow_pair, willow_root, capsys):
    """``transfer --max-cycle``: each point's "reliable" is its cycle <= the threshold, the
    same points are unlabelled in coco.json, and the command counts them; a threshold of 0
    is refused in argparse's line."""
    targets = _targets(tmp_path / "targets", willow_root, 3)
    pts = '{"front wheel": [70, 150], "roof": [150, 40], "door": [150, 100]}'
    base = ["transfer", "--source", str(willow_pair[0]), "--points", pts, "--targets", str(targets), "--model", str(tiny), *MODEL_ARGS, "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    cycles = sorted(p["cycle"] for f in (tmp_path / "all").glob("*.json") if f.name != "coco.json" for p in json.loads(f.read_text())["points"])
    cut = cycles[len(cycles) // 2]
    assert cycles[0] <= cut < cycles[-1]  # the tiny random model's cycles differ: some pass, some fail
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "o"), "--max-cycle", str(cut)]) == 0
    coco = json.loads((tmp_path / "o" / "coco.json").read_text())
    failed = 0
    for im, ann in zip(coco["images"], coco["annotations"]):
        doc = json.loads((tmp_path / "o" / f"{Path(im['file_name']).stem}.json").read_text())
        plain = json.loads((tmp_path / "all" / f"{Path(im['file_name']).stem}.json").read_text())
        assert doc["max_cycle"] == cut and "max_cycle" not in plain
        assert [{k: v for k, v in p.items() if k != "reliable"} for p in doc["points"]] == plain["points"]  # the same matches, marked
        for k, p in enumerate(doc["points"]):
            assert p["reliable"] == (p["cycle"] <= cut)
            assert ann["keypoints"][3 * k:3 * k + 3] == ([p["x"], p["y"], 2] if p["reliable"] else [0, 0, 0])
            failed += not p["reliable"]
    assert failed == sum(c > cut for c in cycles) > 0
    assert f"{failed} of 9 points failed the forward-backward check (cycle above {cut:g})" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "z"), "--max-cycle", "0"])
    assert "must be above 0" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_best_of_sources_takes_the_match_that_comes_back_closest():
    """Per name, the smallest cycle, then the higher score, then the earlier source (by hand);
    a name only one source has comes from it."""
    from sd4match.usermatch import best_of_sources

    s0 = [{"name": "eye", "cycle": 0.20, "score": 0.9}, {"name": "ear", "cycle": 0.05, "score": 0.3}, {"name": "nose", "cycle": 0.1, "score": 0.5}]
    s1 = [{"name": "eye", "cycle": 0.02, "score": 0.1}, {"name": "ear", "cycle": 0.05, "score": 0.6}, {"name": "nose", "cycle": 0.1, "score": 0.5},
          {"name": "tail", "cycle": 0.9, "score": 0.0}]
    got = best_of_sources([s0, s1], ["eye", "ear", "nose", "tail"])
    assert [(m["name"], m["from"], m["score"]) for m in got] == [("eye", 1, 0.1), ("ear", 1, 0.6), ("nose", 0, 0.5), ("tail", 1, 0.0)]


def test_transfer_from_several_sources(tmp_path, featurizer, willow_pair, willow_root, extractions):
    """Two annotated sources: each target's point of a name is the match, from the source
    that has the name, that comes back closest, exactly as each source alone matches it;
    neither source is a target; every picture's features are extracted once."""
    targets = _targets(tmp_path / "targets", willow_root, 3)
    src0, src1 = willow_pair[0], sorted(targets.glob("*.png"))[0]  # the second source lies among the targets
    p0, p1 = {"wheel": (70.0, 150.0), "roof": (150.0, 40.0)}, {"roof": (120.0, 50.0), "light": (40.0, 110.0)}
    m = Matcher(featurizer)
    written = run_transfer(m, [src0, src1], [p0, p1], targets, tmp_path / "o", progress=False)
    assert extractions == [1] * 4  # two sources, the two other pictures
    assert len(written) == 2 and all(src1.stem not in w.name for w in written)
    coco = json.loads((tmp_path / "o" / "coco.json").read_text())
    assert coco["categories"][0]["keypoints"] == ["wheel", "roof", "light"]  # every name once, in the order first given
    for w in written:
        doc = json.loads(w.read_text())
        assert [d["path"] for d in doc["sources"]] == [str(src0), str(src1)] and "source" not in doc
        alone = [{x["name"]: x for x in m.match_points(src, doc["target"]["path"], ps)} for src, ps in ((src0, p0), (src1, p1))]
        assert [p["name"] for p in doc["points"]] == ["wheel", "roof", "light"]
        for p, sp in zip(doc["points"], doc["source_points"]):
            k = p["from"]
            want = min((c["cycle"], -c["score"], j) for j, a in enumerate(alone) for c in a.values() if c["name"] == p["name"])[2]
            assert k == want == sp["from"]
            assert [p["x"], p["y"]] == alone[k][p["name"]]["target"] and p["cycle"] == alone[k][p["name"]]["cycle"]
            assert [sp["x"], sp["y"]] == list((p0, p1)[k][p["name"]])
    with pytest.raises(Sd4MatchError, match="2 sources and 1 point lists"):
        run_transfer(m, [src0, src1], [p0], targets, tmp_path / "z", progress=False)


def test_transfer_cli_pairs_each_source_with_its_points(tmp_path, tiny, willow_pair, willow_root, capsys):
    """--source/--points given twice: one output per other picture, with both sources; unequal
    counts, or a point outside its own source, are one line before any model loads."""
    targets = _targets(tmp_path / "targets", willow_root, 2)
    b = sorted(targets.glob("*.png"))[0]
    base = ["transfer", "--targets", str(targets), "--model", str(tiny), *MODEL_ARGS, "--no-progress"]
    two = ["--source", str(willow_pair[0]), "--points", '{"roof": [150, 40]}', "--source", str(b), "--points", '{"roof": [120, 50], "light": [40, 110]}']
    assert main([*base, *two, "--out", str(tmp_path / "o"), "--check"]) == 0
    doc = json.loads((tmp_path / "o" / f"{sorted(targets.glob('*.png'))[1].stem}.json").read_text())
    assert len(doc["sources"]) == 2 and [p["name"] for p in doc["points"]] == ["roof", "light"] and doc["points"][1]["from"] == 1
    check = json.loads((tmp_path / "o" / "check.json").read_text())
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("check: leave-one-out") and table[1].split() == ["point", "points", "a=0.05", "a=0.1", "a=0.15"]
    assert table[2].split() == ["roof", "2", *(f"{100 * check['by_point']['roof'][k]:.2f}" for k in ("0.05", "0.1", "0.15"))]
    assert table[3].split()[:2] == ["all", "2"] and table[-1] == "values in %"
    assert main([*base, *two[:6], "--out", str(tmp_path / "z")]) == 2
    assert "2 --source and 1 --points" in capsys.readouterr().err
    w, h = Image.open(b).size
    assert main([*base, *two[:6], "--points", f'{{"light": [{w + 5}, 10]}}', "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert str(b) in err and "outside" in err and not (tmp_path / "z").exists()


def test_coco_sources_read_an_annotation_tools_export():
    """The AP-10K fixture's real COCO file: each annotated picture a source, its points those of
    v > 0 named by its category's keypoints (read from the file here, independently)."""
    from sd4match.usermatch import coco_sources

    root = fixture_dir("ap-10k")
    raw = json.loads((root / "test_ap10k.json").read_text())
    got = coco_sources(root / "test_ap10k.json", root)
    assert len(got) == len(raw["annotations"]) == 2
    cats = {c["id"]: c["keypoints"] for c in raw["categories"]}
    files = {im["id"]: im["file_name"] for im in raw["images"]}
    for (picture, points), a in zip(got, raw["annotations"]):
        k = a["keypoints"]
        want = [(n, (float(k[3 * i]), float(k[3 * i + 1]))) for i, n in enumerate(cats[a["category_id"]]) if k[3 * i + 2] > 0]
        assert picture == root / files[a["image_id"]] and points == want and 0 < len(points) < len(cats[a["category_id"]]) + 1
    assert any(k[3 * i + 2] == 0 for a in raw["annotations"] for k in [a["keypoints"]] for i in range(len(k) // 3))  # some are left out


def test_a_transfers_coco_json_corrected_seeds_the_next_transfer(tmp_path, featurizer, willow_pair, willow_root):
    """coco.json back as --from-coco: every target with its points (those kept by the check);
    a broken file is one line naming it and the problem."""
    from sd4match.usermatch import coco_sources

    targets = _targets(tmp_path / "targets", willow_root, 2)
    written = run_transfer(Matcher(featurizer), willow_pair[0], {"a": (70.0, 150.0), "b": (150.0, 40.0)}, targets, tmp_path / "o", progress=False)
    got = coco_sources(tmp_path / "o" / "coco.json", targets)
    want = []
    for w in written:
        doc = json.loads(w.read_text())
        want.append((Path(doc["target"]["path"]), [(p["name"], (p["x"], p["y"])) for p in doc["points"]]))
    assert got == want
    coco = json.loads((tmp_path / "o" / "coco.json").read_text())
    # an export that also holds boxes of a category without keypoints (CVAT's, with a "car" box label): the same sources
    mixed = json.loads(json.dumps(coco))
    mixed["categories"].append({"id": 2, "name": "car", "supercategory": ""})
    mixed["annotations"].append({"id": 9, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0, "segmentation": []})
    mixed["annotations"].append({"id": 10, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "keypoints": []})  # a box not yet annotated
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    assert coco_sources(tmp_path / "mixed.json", targets) == want
    # file names as a Windows tool writes them
    (targets / "sub").mkdir()
    moved = targets / "sub" / Path(mixed["images"][0]["file_name"]).name
    (targets / mixed["images"][0]["file_name"]).rename(moved)
    mixed["images"][0]["file_name"] = "sub\\" + moved.name
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    assert coco_sources(tmp_path / "mixed.json", targets)[0] == (moved, want[0][1])
    moved.rename(targets / moved.name)
    bad = tmp_path / "bad.json"
    for change, problem in ((lambda c: c.pop("categories"), "not a COCO keypoints file"),
                            (lambda c: c["annotations"][0]["keypoints"].extend([1, 2, 2]), "3 keypoints, but its category names 2"),
                            (lambda c: c["images"][0].update(file_name="gone.png"), "gone.png: missing"),
                            (lambda c: c["annotations"][0].update(image_id=[1]), "annotation 1: its category_id or image_id is not in"),
                            (lambda c: c["categories"][0].update(keypoints=["a", "a"]), "annotation 1: its category names a keypoint twice"),
                            (lambda c: [a.update(keypoints=[0, 0, 0, 0, 0, 0]) for a in c["annotations"]], "holds no labelled keypoint")):
        broken = json.loads(json.dumps(coco))
        change(broken)
        bad.write_text(json.dumps(broken))
        with pytest.raises(Sd4MatchError, match=problem):
            coco_sources(bad, targets)
    bad.write_text("{")
    with pytest.raises(Sd4MatchError, match="bad.json: not valid JSON"):
        coco_sources(bad, targets)


def test_transfer_cli_from_coco(tmp_path, tiny, willow_root, capsys):
    """--from-coco with --coco-images: the AP-10K fixture's two annotated animals are the
    sources of a transfer onto other pictures; without any source, one line."""
    from sd4match.usermatch import coco_sources

    root = fixture_dir("ap-10k")
    targets = _targets(tmp_path / "targets", willow_root, 2)
    base = ["transfer", "--targets", str(targets), "--model", str(tiny), *MODEL_ARGS, "--no-progress"]
    assert main([*base, "--from-coco", str(root / "test_ap10k.json"), "--coco-images", str(root), "--out", str(tmp_path / "o")]) == 0
    srcs = coco_sources(root / "test_ap10k.json", root)
    names = list(dict.fromkeys(n for _, ps in srcs for n, _ in ps))
    for f in sorted(targets.glob("*.png")):
        doc = json.loads((tmp_path / "o" / f"{f.stem}.json").read_text())
        assert [d["path"] for d in doc["sources"]] == [str(p) for p, _ in srcs] and [p["name"] for p in doc["points"]] == names
    assert "2 images from 2 sources" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "z")]) == 2
    assert "no source: give --source and --points, or --from-coco" in capsys.readouterr().err and not (tmp_path / "z").exists()
    one = ["--source", str(root / "000000000004.jpg"), "--points", '{"nose": [400, 300]}']
    assert main([*base, *one, "--check", "--coco-images", str(root), "--out", str(tmp_path / "z"), "--model", "no/such-model"]) == 2
    err = capsys.readouterr().err  # before the model (none by that name) is looked for
    assert "--coco-images" in err and "changes nothing without --from-coco" in err and "--check predicts each source's points" in err


def test_a_stopped_transfer_continues_where_it_stopped(tmp_path, featurizer, willow_pair, willow_root, extractions, monkeypatch):
    """Each target done is kept beside --out until the transfer completes: after a Ctrl-C at
    the third target, the same call extracts only the targets left (and the source) and writes
    what an uninterrupted transfer writes; the kept file is then gone. A last line cut by the
    stop is done again; other settings start over, with a warning."""
    from sd4match.usermatch import transfer_partial

    targets = _targets(tmp_path / "targets", willow_root, 4)
    pts = {"a": (70.0, 150.0), "b": (150.0, 40.0)}
    clean = tmp_path / "clean"
    run_transfer(Matcher(featurizer), willow_pair[0], pts, targets, clean, progress=False)
    want = {f.name: f.read_bytes() for f in clean.iterdir() if f.suffix == ".json"}

    out, real, calls = tmp_path / "o", Matcher.match_points, []

    def stop_at_third(self, a, b, points):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, a, b, points)

    monkeypatch.setattr(Matcher, "match_points", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_transfer(Matcher(featurizer), willow_pair[0], pts, targets, out, progress=False)
    monkeypatch.setattr(Matcher, "match_points", real)
    kept = transfer_partial(out)
    assert not out.exists() and len(kept.read_text().splitlines()) == 1 + 2  # its header, two targets
    extractions.clear()
    run_transfer(Matcher(featurizer), willow_pair[0], pts, targets, out, progress=False)
    assert extractions == [1, 1, 1]  # the source, the two targets left
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.suffix == ".json"} == want and not kept.exists()

    # a line cut by a stop: that target is done again
    monkeypatch.setattr(Matcher, "match_points", stop_at_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_transfer(Matcher(featurizer), willow_pair[0], pts, targets, out, progress=False)
    monkeypatch.setattr(Matcher, "match_points", real)
    kept.write_text(kept.read_text()[:-20])
    extractions.clear()
    run_transfer(Matcher(featurizer), willow_pair[0], pts, targets, out, progress=False)
    assert extractions == [1, 1, 1, 1]  # the source, the cut target, the two left
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.suffix == ".json"} == want

    # another seed: what was kept is not used
    monkeypatch.setattr(Matcher, "match_points", stop_at_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_transfer(Matcher(featurizer), willow_pair[0], pts, targets, out, progress=False)
    monkeypatch.setattr(Matcher, "match_points", real)
    extractions.clear()
    with pytest.warns(UserWarning, match="an unfinished transfer of other sources, points or settings; this one starts over"):
        run_transfer(Matcher(featurizer, seed=1), willow_pair[0], pts, targets, out, progress=False)
    assert extractions == [1] * 5 and not kept.exists()
    # what Ctrl-C or SIGTERM prints: where the targets done are
    import argparse

    from sd4match.cli import _stopped_line

    assert _stopped_line(argparse.Namespace(command="transfer", out=out), "interrupted") == (
        f"sd4match: interrupted; what was done is kept in {tmp_path / '.o.transfer-partial.jsonl'}: the same command continues it")


def test_a_transfer_stopped_by_a_bad_picture_keeps_the_targets_done(tmp_path, featurizer, willow_pair, willow_root, extractions):
    """A target whose header reads but whose pixels do not: the error names it and says the
    targets done are kept; with the picture removed, the same command does only what is left."""
    targets = _targets(tmp_path / "targets", willow_root, 3)
    bad = targets / "zz_cut.png"
    data = sorted(targets.glob("*.png"))[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    from sd4match.usermatch import transfer_partial

    with pytest.raises(Sd4MatchError, match=r"zz_cut.png: .*; the 3 targets done are kept: mend or remove the picture and run the same command again"):
        run_transfer(Matcher(featurizer), willow_pair[0], {"a": (70.0, 150.0)}, targets, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and len(transfer_partial(tmp_path / "o").read_text().splitlines()) == 4
    bad.unlink()
    extractions.clear()
    run_transfer(Matcher(featurizer), willow_pair[0], {"a": (70.0, 150.0)}, targets, tmp_path / "o", progress=False)
    assert extractions == [] and len(list((tmp_path / "o").glob("*.json"))) == 4  # nothing: every target was kept; 3 JSONs and coco.json


def test_transfer_skip_bad_goes_past_unreadable_targets(tmp_path, tiny, willow_pair, willow_root, capsys):
    """--skip-bad: a cut picture and a text file named .png are passed over and listed with
    their problems in skipped.json; the others are transferred. Without it the text file is
    refused before any model loads."""
    targets = _targets(tmp_path / "targets", willow_root, 2)
    data = sorted(targets.glob("*.png"))[0].read_bytes()
    (targets / "cut.png").write_bytes(data[: len(data) // 2])
    (targets / "notes.png").write_text("not a picture")
    base = ["transfer", "--source", str(willow_pair[0]), "--points", '{"a": [70, 150]}', "--targets", str(targets), "--model", str(tiny), *MODEL_ARGS,
            "--no-progress", "--out", str(tmp_path / "o")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "notes.png" in err and "; --skip-bad goes past targets that cannot be read" in err and not (tmp_path / "o").exists()
    assert main([*base, "--skip-bad"]) == 0
    out = tmp_path / "o"
    assert sorted(f.name for f in out.iterdir() if not f.name.startswith(".")) == sorted(
        [f"{f.stem}.json" for f in targets.glob("*.png") if f.stem not in ("cut", "notes")] + ["coco.json", "sheet.png", "skipped.json"])
    skipped = json.loads((out / "skipped.json").read_text())
    assert [d["path"] for d in skipped] == ["cut.png", "notes.png"] and all(d["problem"] for d in skipped)
    assert len(json.loads((out / "coco.json").read_text())["images"]) == 2
    err = capsys.readouterr().err
    assert "2 targets could not be read and were skipped" in err and "the first: cut.png: " in err
    for f in ("cut.png", "notes.png"):
        (targets / f).unlink()
    assert main([*base, "--skip-bad"]) == 0 and not (out / "skipped.json").exists()  # this run's files only


def test_the_check_predicts_each_source_from_the_others(tmp_path, featurizer, willow_root, capsys):
    """--check on one picture annotated twice, the second disagreeing on "b" by one cell:
    each source's "a" comes back exactly (nn on identical maps), its "b" lands on the other's
    "b", an error of one cell's width (42 px of 300): wrong at 0.05 and 0.1, right at 0.15;
    "c", which one source alone has, is not checked. A single source has nothing to check."""
    rng = np.random.default_rng(1)
    pic = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).resize((300, 200), Image.Resampling.BICUBIC)
    for name in ("one.png", "two.png"):
        pic.save(tmp_path / name)
    a, b, c, d = (tuple(map(float, p)) for p in _cell_centre_pixels(featurizer, (300, 200), [[2, 3], [4, 4], [5, 4], [6, 1]]))
    err = (c[0] - b[0]) / 300
    assert c[1] == b[1] and 0.1 < err <= 0.15
    targets = _targets(tmp_path / "targets", willow_root, 1)
    one, two = {"a": a, "b": b, "c": d}, {"a": a, "b": c}
    run_transfer(Matcher(featurizer, rule="nn"), [tmp_path / "one.png", tmp_path / "two.png"], [one, two], targets, tmp_path / "o",
                 progress=False, check=True)
    doc = json.loads((tmp_path / "o" / "check.json").read_text())
    assert doc["alphas"] == [0.05, 0.1, 0.15] and set(doc["by_point"]) == {"a", "b"}
    assert doc["by_point"]["a"] == {"n_points": 2, "0.05": 1.0, "0.1": 1.0, "0.15": 1.0}
    assert doc["by_point"]["b"] == {"n_points": 2, "0.05": 0.0, "0.1": 0.0, "0.15": 1.0}
    assert doc["all"] == {"n_points": 4, "0.05": 0.5, "0.1": 0.5, "0.15": 1.0}
    assert [[p["error"] for p in s["points"]] for s in doc["sources"]] == [[0.0, round(err, 4)], [0.0, round(err, 4)]]
    with pytest.raises(Sd4MatchError, match="give two or more"):
        run_transfer(Matcher(featurizer), tmp_path / "one.png", one, targets, tmp_path / "z", progress=False, check=True)


def test_the_check_with_a_cycle_threshold_scores_what_it_keeps():
    """check_sources with max_cycle, on matches set by hand: of 4 points, the 2 with a cycle
    at most 0.1 are kept (share 0.5), one of them within 0.05 of its truth."""
    from types import SimpleNamespace

    from sd4match.usermatch import check_sources

    pics = [SimpleNamespace(name=f"s{k}", size=(100, 50)) for k in range(2)]
    sets = [[("a", (10.0, 10.0)), ("b", (50.0, 20.0))], [("a", (20.0, 10.0)), ("b", (50.0, 40.0))]]
    # (from, to, name) -> (predicted target, cycle)
    made = {("s1", "s0", "a"): ((11.0, 10.0), 0.02), ("s1", "s0", "b"): ((50.0, 30.0), 0.3),
            ("s0", "s1", "a"): ((28.0, 10.0), 0.1), ("s0", "s1", "b"): ((50.0, 41.0), 0.5)}

    class Stub:
        def match_points(self, a, b, points):
            return [{"name": n, "source": list(xy), "target": list(made[(a.name, b.name, n)][0]), "score": 0.5,
                     "cycle": made[(a.name, b.name, n)][1]} for n, xy in points]

    doc = check_sources(Stub(), pics, sets, max_cycle=0.1)
    errors = [[p["error"] for p in s["points"]] for s in doc["sources"]]
    assert errors == [[0.01, 0.1], [0.08, 0.01]]  # |predicted - truth| / 100
    assert doc["all"] == {"n_points": 4, "0.05": 0.5, "0.1": 1.0, "0.15": 1.0}
    assert doc["reliable"] == {"max_cycle": 0.1, "share": 0.5, "n_points": 2, "0.05": 0.5, "0.1": 1.0, "0.15": 1.0}
    assert "reliable" not in check_sources(Stub(), pics, sets)
    from sd4match.cli import _check_table

    rows = [line.split() for line in _check_table(doc).splitlines()[2:-1]]
    assert rows == [["a", "2", "50.00", "100.00", "100.00"], ["b", "2", "50.00", "100.00", "100.00"], ["all", "4", "50.00", "100.00", "100.00"],
                    ["cycle", "<=", "0.1", "2", "50.00", "100.00", "100.00"]]


def test_a_transfer_output_seeds_the_next_without_its_doubtful_points(tmp_path):
    """Points marked "reliable": false failed their check: they are no seed for another transfer."""
    doc = {"points": [{"name": "a", "x": 1.0, "y": 2.0, "reliable": True}, {"name": "b", "x": 3.0, "y": 4.0, "reliable": False},
                      {"name": "c", "x": 5.0, "y": 6.0}]}
    f = tmp_path / "t.json"
    f.write_text(json.dumps(doc))
    assert parse_points(str(f)) == [("a", (1.0, 2.0)), ("c", (5.0, 6.0))]
    f.write_text(json.dumps({"points": [doc["points"][1]]}))
    with pytest.raises(Sd4MatchError, match=r'holds no points \(its 1 marked "reliable": false are left out\)'):
        parse_points(str(f))


# -- points ----------------------------------------------------------------------------------


def test_parse_points_forms(tmp_path):
    assert parse_points("1,2;3.5,-4e1") == [("p0", (1.0, 2.0)), ("p1", (3.5, -40.0))]
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"name": "eye", "x": 3, "y": 4}, [5, 6]]))
    assert parse_points(str(f)) == [("eye", (3.0, 4.0)), ("p1", (5.0, 6.0))]
    f.write_text(json.dumps({"matches": [], "points": {"nose": [1, 2]}}))
    assert parse_points(str(f)) == [("nose", (1.0, 2.0))]
    with pytest.raises(Sd4MatchError, match="'1;2' is not 'x,y'|'1' is not 'x,y'"):
        parse_points("1;2")
    f.write_text(json.dumps({"eye": [1]}))
    with pytest.raises(Sd4MatchError, match="point 'eye' is \\[1\\], not \\[x, y\\]"):
        parse_points(str(f))
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"nose": [1, 2]}).encode())  # saved by Notepad: a byte-order mark
    assert parse_points(str(f)) == [("nose", (1.0, 2.0))]
    f.write_bytes(json.dumps({"nose": [1, 2]}).encode("utf-16"))
    with pytest.raises(Sd4MatchError, match=r"p\.json: UTF-16 text"):
        parse_points(str(f))
    # JSON given as the text itself, as one types it in a shell
    assert parse_points(' {"left eye": [10, 10], "nose": [50.5, 40]}') == [("left eye", (10.0, 10.0)), ("nose", (50.5, 40.0))]
    assert parse_points("[[1, 2], [3, 4]]") == [("p0", (1.0, 2.0)), ("p1", (3.0, 4.0))]
    with pytest.raises(Sd4MatchError, match=r"^--points: not valid JSON"):
        parse_points('{"eye": [1, 2]')
    # spaces only around the comma and the semicolons: "1 20,80" was read as (120, 80)
    assert parse_points(" 1 , 2 ; 3,4 ") == [("p0", (1.0, 2.0)), ("p1", (3.0, 4.0))]
    with pytest.raises(Sd4MatchError, match="'1 20,80' is not 'x,y'"):
        parse_points("1 20,80")
    # one name, one point: json keeps the last of two equal keys, and the outputs tell points apart by name
    f.write_text('{"eye": [1, 2], "eye": [3, 4]}')
    with pytest.raises(Sd4MatchError, match=r"p\.json: point 'eye' is given twice"):
        parse_points(str(f))
    f.write_text(json.dumps([{"name": "eye", "x": 1, "y": 2}, {"name": "eye", "x": 3, "y": 4}]))
    with pytest.raises(Sd4MatchError, match=r"p\.json: point 'eye' is given twice"):
        parse_points(str(f))
    with pytest.raises(Sd4MatchError, match="point 'eye' is given twice"):
        named_points([("eye", (1, 2)), ("eye", (3, 4))])


def test_point_outside_the_image_is_rejected_and_nothing_written(tmp_path, tiny, willow_pair, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "matches.json").write_text("earlier result")
    args = ["match", str(willow_pair[0]), str(willow_pair[1]), "--points", "10,20;300.5,10", "--model", str(tiny), *MODEL_ARGS, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"sd4match: error: point p1 (300.5, 10) lies outside {willow_pair[0]} (300x200 pixels)"
    assert (out / "matches.json").read_text() == "earlier result" and sorted(p.name for p in out.iterdir()) == ["matches.json"]
    # a point left of the picture: argparse took "-3,5" for an option ("expected one argument"); now the same line
    assert main([*args[:4], "-3,5", *args[5:]]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"sd4match: error: point p0 (-3, 5) lies outside {willow_pair[0]} (300x200 pixels)"
    img = open_image(willow_pair[0])
    check_points([("edge", (300.0, 200.0))], img)  # the far edge is still inside
    with pytest.raises(Sd4MatchError, match="point nan"):
        check_points([("nan", (float("nan"), 1.0))], img)


# -- robust image input ------------------------------------------------------------------------


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_grayscale_to_rgb(tmp_path):
    p = _save(tmp_path, "g.png", Image.fromarray(np.full((4, 6), 77, np.uint8), "L"))
    img = open_image(p)
    assert img.image.mode == "RGB" and img.size == (6, 4) and np.all(np.asarray(img.image) == 77)


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., 0] = 200
    a[:, :3, 3] = 255  # left half opaque red, right half fully transparent
    img = open_image(_save(tmp_path, "a.png", Image.fromarray(a, "RGBA")))
    px = np.asarray(img.image)
    assert (px[0, 0] == [200, 0, 0]).all() and (px[0, 5] == [255, 255, 255]).all()


def test_palette_to_rgb(tmp_path):
    im = Image.new("P", (6, 4))
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.paste(1, (0, 0, 6, 4))
    assert (np.asarray(open_image(_save(tmp_path, "p.png", im)).image) == [10, 20, 30]).all()


def test_cmyk_to_rgb(tmp_path):
    im = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    px = np.asarray(open_image(_save(tmp_path, "c.jpg", im, quality=100)).image).astype(int)
    assert (np.abs(px - [255, 0, 0]) <= 3).all()


def test_sixteen_bit_to_rgb(tmp_path):
    a = np.zeros((4, 6), np.uint16)
    a[:, 3:] = 65535
    a[:, :3] = 32896  # 128 * 257
    px = np.asarray(open_image(_save(tmp_path, "16.png", Image.fromarray(a))).image)
    assert (px[:, :3] == 128).all() and (px[:, 3:] == 255).all()


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((4, 6, 3), np.uint8)
    a[0, 0] = [255, 0, 0]  # top-left stored pixel is red
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: show it turned 90 degrees clockwise
    p = _save(tmp_path, "r.png", im, exif=exif.tobytes())
    img = open_image(p)
    assert img.size == (4, 6) and img.image.size == (4, 6)
    px = np.asarray(img.image)
    assert (px[0, 3] == [255, 0, 0]).all() and px.sum() == 255  # the red corner is now top-right


def test_large_image_downscaled_before_the_model(tmp_path):
    p = _save(tmp_path, "big.png", Image.new("RGB", (6000, 1500), (1, 2, 3)))
    img = open_image(p, max_side=1000)
    assert img.size == (6000, 1500) and img.image.size == (1000, 250) and img.scale == pytest.approx(1 / 6)


@pytest.mark.parametrize("kind", ["one-pixel", "empty", "text", "truncated", "missing"])
def test_bad_images_rejected_naming_the_file(tmp_path, kind, willow_pair, tiny, capsys):
    p = tmp_path / f"{kind}.png"
    if kind == "one-pixel":
        Image.new("RGB", (1, 1)).save(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("not an image")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        p.write_bytes(buf.getvalue()[:400])
    expected = {"one-pixel": "is 1x1 pixels, too small", "empty": "not a readable image", "text": "not a readable image",
                "truncated": "cannot decode image", "missing": "image file is missing"}[kind]
    with pytest.raises(Sd4MatchError, match=expected):
        open_image(p)
    assert main(["match", str(p), str(willow_pair[1]), "--points", "0,0", "--model", str(tiny), *MODEL_ARGS, "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and str(p) in err[0] and expected in err[0]
    assert not (tmp_path / "o").exists()


def test_trained_prompt_folders_cpm_and_category(tmp_path, tiny, featurizer, willow_pair, capsys):
    """A saved CPM prompt builds one prompt per pair from DINOv2 tokens of both images (features
    per pair); a category prompt needs --category."""
    import torch

    from sd4match.features import DinoFeaturizer
    from sd4match.prompts import make_prompt
    from sd4match.testing import tiny_dinov2

    dino = DinoFeaturizer.from_pretrained(tiny_dinov2(tmp_path / "dino"))
    cpm = make_prompt("cpm", featurizer, dino_dim=dino.feature_dim, n_patches=dino.grid_size[0] * dino.grid_size[1])
    cpm.save(tmp_path / "cpm")
    m = Matcher(featurizer, str(tmp_path / "cpm"), dino=dino)
    a, b = open_image(willow_pair[0]), open_image(willow_pair[1])
    c = open_image(sorted(willow_pair[0].parent.glob("*.png"))[2])
    fab = m.features(a, b)[0]
    fac = m.features(a, c)[0]
    assert m.pair_dependent and m.is_cached(a, b) and m.is_cached(a, c)
    assert not torch.equal(fab, fac)  # A's features differ with its partner: the prompt saw both images
    assert m.match_points(a, b, [("p", (50.0, 60.0))])[0]["target"] == m.match_points(a, b, [("p", (50.0, 60.0))])[0]["target"]

    make_prompt("category", featurizer, categories=["car", "duck"]).save(tmp_path / "cat")
    with pytest.raises(Sd4MatchError, match="needs --category"):
        Matcher(featurizer, str(tmp_path / "cat"))
    with pytest.raises(Sd4MatchError, match="'horse' has no learned prompt"):
        Matcher(featurizer, str(tmp_path / "cat"), category="horse")
    out = tmp_path / "m"
    assert main(["match", str(willow_pair[0]), str(willow_pair[1]), "--points", "50,60", "--prompt", str(tmp_path / "cat"), "--category", "car",
                 "--model", str(tiny), *MODEL_ARGS, "--out", str(out)]) == 0
    res = json.loads((out / "matches.json").read_text())
    assert res["settings"]["prompt"] == str(tmp_path / "cat") and res["settings"]["category"] == "car"


def test_a_cpm_prompt_brings_its_own_dinov2(tmp_path, tiny, featurizer, willow_pair, willow_root, capsys):
    """Without --dino, a CPM prompt folder's recorded DINOv2 is used (before: always dinov2-b,
    a download, whichever DINOv2 the prompt was trained with); a --dino of another width is
    refused before any model loads; another DINOv2 of the same width is warned about; a
    recorded DINOv2 that is gone is named, with --dino as the way round it."""
    import shutil

    from sd4match.features import DinoFeaturizer
    from sd4match.prompts import make_prompt
    from sd4match.testing import tiny_dinov2

    dino_dir = tiny_dinov2(tmp_path / "dino")
    dino = DinoFeaturizer.from_pretrained(dino_dir)
    make_prompt("cpm", featurizer, dino_dim=dino.feature_dim, n_patches=dino.grid_size[0] * dino.grid_size[1],
                dino_model=dino.model_id).save(tmp_path / "cpm")
    args = ["match", str(willow_pair[0]), str(willow_pair[1]), "--points", "50,60", "--prompt", str(tmp_path / "cpm"),
            "--model", str(tiny), *MODEL_ARGS, "--out", str(tmp_path / "m")]
    assert main(args) == 0
    want = json.loads((tmp_path / "m" / "matches.json").read_text())["matches"]
    capsys.readouterr()
    assert main(args + ["--dino", "dinov2-s"]) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: --dino dinov2-s: gives 384-d tokens, and the prompt {tmp_path / 'cpm'} takes "
                                               f"{dino.feature_dim}-d ones (it was trained with DINOv2 {dino.model_id})")
    shutil.copytree(dino_dir, tmp_path / "dino-copy")
    assert main(args + ["--dino", str(tmp_path / "dino-copy")]) == 0
    assert (f"sd4match: warning: --dino {tmp_path / 'dino-copy'}: the prompt {tmp_path / 'cpm'} was trained with DINOv2 {dino.model_id}; "
            "its tokens may differ") in capsys.readouterr().err.splitlines()
    assert json.loads((tmp_path / "m" / "matches.json").read_text())["matches"] == want  # the same weights give the same matches
    ev = tmp_path / "ev"
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--limit", "2", "--prompt", str(tmp_path / "cpm"),
                 "--model", str(tiny), *MODEL_ARGS, "--out", str(ev), "--no-progress"]) == 0
    assert json.loads((ev / "score.json").read_text())["run"]["request"]["dino"] == dino.model_id
    capsys.readouterr()
    dino_dir.rename(tmp_path / "gone")
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: --prompt {tmp_path / 'cpm'}: trained with DINOv2 {dino.model_id}, which is not here "
                                               f"({dino.model_id}: no such model folder or checkpoint file); pass --dino")


def test_disk_cache_skips_extraction_on_the_next_run(tmp_path, featurizer, willow_pair, willow_root, extractions):
    import torch

    calls = extractions
    targets = _targets(tmp_path / "targets", willow_root, 2)
    pts = [("a", (10.0, 10.0)), ("b", (120.0, 90.0))]
    run_transfer(Matcher(featurizer, cache_dir=tmp_path / "cache"), willow_pair[0], pts, targets, tmp_path / "o1", progress=False)
    assert len(calls) == 3 and len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 3
    run_transfer(Matcher(featurizer, cache_dir=tmp_path / "cache"), willow_pair[0], pts, targets, tmp_path / "o2", progress=False)
    assert len(calls) == 3  # nothing extracted again
    assert [p.read_text() for p in sorted((tmp_path / "o1").glob("*.json"))] == [p.read_text() for p in sorted((tmp_path / "o2").glob("*.json"))]
    # another prompt or seed is another cache entry, never a stale hit
    run_transfer(Matcher(featurizer, "text:a photo of a car", cache_dir=tmp_path / "cache"), willow_pair[0], pts, targets, tmp_path / "o3", progress=False)
    run_transfer(Matcher(featurizer, seed=1, cache_dir=tmp_path / "cache"), willow_pair[0], pts, targets, tmp_path / "o4", progress=False)
    assert len(calls) == 9 and len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 9
    # a damaged entry is recomputed, not trusted
    m = Matcher(featurizer, cache_dir=tmp_path / "cache")
    src = open_image(willow_pair[0])
    from safetensors.torch import load

    victim = m.store.path("features", m.store_keys(src)[0])
    good = load(victim.read_bytes())["features"]  # a copy: load_file would map the file about to be cut
    victim.write_bytes(victim.read_bytes()[:100])
    for p in [willow_pair[0], *sorted(targets.glob("*.png"))]:
        m.features(open_image(p), open_image(p))
    assert len(calls) == 10  # only the damaged one
    # rewritten with the same features (seeded by content; the page and match batch freely, so equal up to float summation order)
    torch.testing.assert_close(load(victim.read_bytes())["features"], good, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(m.features(src, src)[0]).all()


def test_labels_never_overlap_nor_leave_their_picture():
    """Twenty points crowded on one spot: every drawn label box is inside its panel and no two overlap."""
    from PIL import ImageDraw

    from sd4match.viz import _font, _Labels

    img = Image.new("RGB", (400, 300))
    placer = _Labels(ImageDraw.Draw(img), _font(12))
    panel = (0, 0, 200, 300)
    placed = [placer.place(190 + (i % 3), 5 + (i // 3), 3, f"p{i}", panel) for i in range(20)]
    assert any(placed) and not all(placed)  # crowded: some stay unlabelled rather than collide
    for i, a in enumerate(placer.boxes):
        assert a[0] >= 0 and a[1] >= 0 and a[2] <= 200 and a[3] <= 300
        for b in placer.boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_automatic_points_lie_on_the_salient_objects(fixture_images):
    """The offline first run: with effnet-lite0 on cat.jpg -> pets.jpg, the automatic points sit on
    the cat and their matches on the dogs (hand-drawn boxes around the animals, in pixels)."""
    from sd4match.features import load_featurizer

    m = Matcher(load_featurizer("effnet-lite0"), "empty", rule="nn")
    a, b = open_image(fixture_images / "cat.jpg"), open_image(fixture_images / "pets.jpg")
    pts = m.auto_points(a, b)
    assert 8 <= len(pts) <= 20
    sa, sb = a.size[0] / 721, b.size[0] / 572  # the boxes were read off the pictures drawn 480 px tall
    cat = (60 * sa, 40 * sa, 520 * sa, 480 * sa)
    dogs = [(110 * sb, 0, 300 * sb, 330 * sb), (370 * sb, 170 * sb, 572 * sb, 420 * sb)]
    inside = lambda p, box: box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]  # noqa: E731
    on_cat = sum(inside(xy, cat) for _, xy in pts)
    targets = [t["target"] for t in m.match_points(a, b, pts)]
    on_dogs = sum(any(inside(t, d) for d in dogs) for t in targets)
    assert on_cat >= 0.8 * len(pts) and on_dogs >= 0.7 * len(pts), (on_cat, on_dogs, len(pts))
    # spread: no two points on the same cell
    assert len({xy for _, xy in pts}) == len(pts)


def test_each_match_is_checked_forward_and_backward(willow_pair):
    """match_points matches each target back into A: with one-hot cell features and the
    nearest-neighbour rule a point goes to the same cell of B and comes back to its cell's
    centre in A, so its cycle is its distance from that centre over A's longer side,
    computed here by hand."""
    import torch

    import sd4match

    class SamePlace(sd4match.Featurizer):
        model_id, resolution = "same-place", 64

        @property
        def grid_size(self):
            return (8, 6)

        def settings(self):
            return {"featurizer": self.model_id}

        def forward(self, images, **unused):
            n = len(images) if not isinstance(images, torch.Tensor) else images.shape[0]
            return torch.eye(48).reshape(48, 6, 8).expand(n, -1, -1, -1)

    a, b = open_image(willow_pair[0]), open_image(willow_pair[1])
    pts = [("p", (20.0, 190.0)), ("q", (151.0, 99.0))]
    got = Matcher(SamePlace(), rule="nn").match_points(a, b, pts)
    (wa, ha), (wb, hb) = a.size, b.size
    for m, (_, (x, y)) in zip(got, pts):
        col, row = int(x * 8 // wa), int(y * 6 // ha)
        assert m["target"] == pytest.approx([(col + 0.5) * wb / 8, (row + 0.5) * hb / 6], abs=0.01)
        back = [(col + 0.5) * wa / 8, (row + 0.5) * ha / 6]
        assert m["back"] == pytest.approx(back, abs=0.01)
        assert m["cycle"] == pytest.approx(np.hypot(x - back[0], y - back[1]) / max(wa, ha), abs=1e-4)
