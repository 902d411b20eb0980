"""Synthetic warped pairs: the rendered pixels must follow the exact point correspondence."""

import json

import numpy as np
import pytest
from PIL import Image

from sd4match.data import load_pair_images, open_dataset
from sd4match.data.synthetic import (
    WarpConfig, apply_homography, correspond, homography_from_points, make_pair, mirror_matrix, pair_rng, warp_image,
)


def blob_image(size, centres, sigma=2.0):
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres in continuous coordinates
    a = np.zeros((h, w))
    for cx, cy in centres:
        a += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def centroid_near(img, p, r=8):
    a = np.asarray(img.convert("L"), dtype=float)
    h, w = a.shape
    x0, x1 = int(max(0, p[0] - r)), int(min(w, p[0] + r))
    y0, y1 = int(max(0, p[1] - r)), int(min(h, p[1] + r))
    win = a[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    return np.array([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])


def test_homography_from_points_is_exact():
    src = np.array([[0, 0], [10, 0], [10, 5], [0, 5]], float)
    dst = np.array([[1, 2], [12, 1], [11, 8], [0, 6]], float)
    np.testing.assert_allclose(apply_homography(homography_from_points(src, dst), src), dst, atol=1e-9)


@pytest.mark.parametrize("kind", ["homography", "affine"])
def test_warped_blobs_land_on_mapped_points(kind):
    size = (160, 120)
    centres = [(40.0, 30.0), (120.0, 40.0), (80.0, 60.0), (50.0, 90.0), (110.0, 95.0)]
    img = blob_image(size, centres)
    cfg = WarpConfig(kind=kind, color=0.0, mirror_prob=0.5)
    for seed in range(4):
        pair = make_pair(img, pair_rng(seed, "x"), cfg, src_kps=np.array(centres))
        assert pair.keep.sum() >= 3
        for p in pair.trg_kps:
            if 10 < p[0] < size[0] - 10 and 10 < p[1] < size[1] - 10:
                # the blob is smeared by the local scale, but its centre follows the point
                assert np.linalg.norm(centroid_near(pair.image, p) - p) < 0.6


def test_mirror_matrix_and_warp_image_convention():
    img = blob_image((64, 48), [(10.5, 20.5)], sigma=1.5)
    out = warp_image(img, mirror_matrix(64))
    np.testing.assert_allclose(centroid_near(out, (64 - 10.5, 20.5)), (53.5, 20.5), atol=0.05)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[:, ::-1])


def test_flip_permutation_relabels_mirrored_targets():
    H = mirror_matrix(100)
    pts = np.array([[20.0, 50.0], [80.0, 50.0], [50.0, 10.0]])  # left eye, right eye, nose
    _, geo, _ = correspond(H, (100, 100), pts, mirror=True)
    _, sem, _ = correspond(H, (100, 100), pts, mirror=True, flip_permutation=[1, 0, 2])
    np.testing.assert_allclose(geo, [[80, 50], [20, 50], [50, 10]])  # geometric images of each point
    np.testing.assert_allclose(sem, [[20, 50], [80, 50], [50, 10]])  # "left eye" of the mirrored picture
    with pytest.raises(ValueError):
        correspond(H, (100, 100), pts, mirror=True, flip_permutation=[0, 0, 1])


def test_dataset_splits_are_disjoint_and_seeded(willow_root):
    ds = open_dataset("synthetic", willow_root)
    parts = ds.split_images()
    sets = {k: set(v) for k, v in parts.items()}
    assert sum(len(v) for v in sets.values()) == 50
    assert not (sets["trn"] & sets["val"]) and not (sets["trn"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["test"]) == 5 and len(sets["val"]) == 5
    a, b = ds.pairs("test"), open_dataset("synthetic", willow_root).pairs("test")
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    c = open_dataset("synthetic", willow_root, seed=1).pairs("test")
    assert a[0].meta["synthetic"]["homography"] != c[0].meta["synthetic"]["homography"]
    assert {r.src for r in ds.pairs("trn")} == sets["trn"]


def test_record_images_follow_record_points(willow_root):
    ds = open_dataset("synthetic", willow_root, cfg=WarpConfig(color=0.0))
    r = ds.pairs("val")[0]
    src, trg = load_pair_images(willow_root, r)
    assert src.size == trg.size == r.trg_size
    H = np.array(r.meta["synthetic"]["homography"])
    np.testing.assert_allclose(apply_homography(H, r.src_kps), r.trg_kps)
    # pixel check: the target, warped back by H^-1, equals the source where the warp stays inside
    back = np.asarray(warp_image(trg, np.linalg.inv(H)), dtype=float)
    white = Image.new("RGB", src.size, (255, 255, 255))
    valid = np.asarray(warp_image(warp_image(white, H), np.linalg.inv(H)))[..., 0] > 250
    err = np.abs(back - np.asarray(src, dtype=float)).mean(axis=2)[valid]
    assert np.median(err) < 12  # two bicubic resamplings of a real photo


def test_pairs_cli_on_synthetic(tmp_path, willow_root):
    from sd4match.cli import main

    out = tmp_path / "p.jsonl"
    assert main(["pairs", "--dataset", "synthetic", "--root", str(willow_root), "--split", "test", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 5 * WarpConfig().pairs_per_image
    assert all(r["src"] == r["trg"] and "homography" in r["meta"]["synthetic"] for r in rows)
    assert all(r["pck_base"]["sd4match"] == 768 for r in rows)


@pytest.mark.parametrize("field,value", [("scale", (1.2, 0.9)), ("scale", (0.0, 1.0)), ("mirror_prob", 1.5), ("color", 1.0), ("grid", 0),
                                         ("pairs_per_image", 0), ("rotation_deg", -5.0)])
def test_warp_settings_out_of_range_are_named(field, value):
    with pytest.raises(ValueError, match=rf"^warp setting {field} = .* is out of range"):
        WarpConfig(**{field: value})


def test_pictures_an_sd4match_run_drew_inside_the_root_are_not_pairs(tmp_path, fixture_images):
    """A sweep into a folder inside the root (its plots), a transfer's sheet, a match's
    pictures: a folder holding a run's lock or an output's manifest is not read, so the next
    run's splits are the same pairs (they were drawn from a list that had grown)."""
    import shutil

    from sd4match.data.images import list_images

    root = tmp_path / "photos"
    shutil.copytree(fixture_images, root)
    before = [r.to_json() for r in open_dataset("synthetic", root).pairs("test")]
    for sub, mark in (("runs/sweep", ".sd4match.lock"), ("m", ".sd4match-files")):
        (root / sub).mkdir(parents=True)
        (root / sub / mark).write_text("")
        shutil.copy(fixture_images / "cat.jpg", root / sub / "heatmap.png")
    shutil.copy(fixture_images / "cat.jpg", root / "runs" / "own.jpg")  # beside a run folder, not in one: a picture
    assert [p.relative_to(root).as_posix() for p in list_images(root) if "/" in p.relative_to(root).as_posix()] == ["runs/own.jpg"]
    (root / "runs" / "own.jpg").unlink()
    assert [r.to_json() for r in open_dataset("synthetic", root).pairs("test")] == before
    (root / ".sd4match.lock").write_text("")  # the root itself a run's folder too: its pictures are still read
    assert len(list_images(root)) == len(list(fixture_images.glob("*.jpg")))
