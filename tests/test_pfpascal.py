"""PF-Pascal reader on the real pair lists.

The fixtures carry no PF-Pascal images or .mat annotations, so these tests build
stand-ins in a temporary folder: solid JPEGs of a chosen size, and .mat files with
``kps`` (with NaN rows) and ``bbox`` written by scipy, in the official layout.
"""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from sd4match.data import open_dataset
from sd4match.data.pfpascal import CLASSES
from sd4match.errors import DataError

N_SLOTS = 6


def _size_for(name: str) -> tuple[int, int]:
    # a deterministic, non-square size per image, large enough for PF-Pascal's points
    h = 7 + sum(map(ord, name)) % 5
    return 500, 300 + 10 * h


def _mat_for(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    w, h = _size_for(name)
    kps = np.stack([rng.uniform(0, w, N_SLOTS), rng.uniform(0, h, N_SLOTS)], axis=1)
    kps[rng.random(N_SLOTS) < 0.3] = np.nan
    bbox = np.array([[10.0, 20.0, w - 30.0, h - 40.0]])
    return kps, bbox


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory):
    from conftest import fixture_dir

    lists = fixture_dir("pf-pascal")
    root = tmp_path_factory.mktemp("pf-pascal")
    for f in lists.glob("*.csv"):
        shutil.copy(f, root / f.name)
    for f in root.glob("*.csv"):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                cat = CLASSES[int(row["class"]) - 1]
                for rel in (row["source_image"], row["target_image"]):
                    p = root / rel
                    if not p.exists():
                        p.parent.mkdir(parents=True, exist_ok=True)
                        Image.new("RGB", _size_for(p.name), (90, 120, 150)).save(p)
                    m = root / "PF-dataset-PASCAL/Annotations" / cat / (p.stem + ".mat")
                    if not m.exists():
                        m.parent.mkdir(parents=True, exist_ok=True)
                        kps, bbox = _mat_for(p.name)
                        savemat(str(m), {"kps": kps, "bbox": bbox})
    return root


def test_split_sizes(pascal_root):
    ds = open_dataset("pfpascal", pascal_root)
    assert {s: len(ds.pairs(s)) for s in ds.splits} == {"trn": 2940, "val": 308, "test": 299}


def test_test_list_with_inline_keypoints(pascal_root):
    recs = open_dataset("pfpascal", pascal_root).pairs("test")
    r = recs[0]
    # first row of the real test_pairs.csv: class 1 = aeroplane, 11 points
    assert (r.id, r.category) == ("0", "aeroplane")
    assert r.src == "PF-dataset-PASCAL/JPEGImages/2011_001407.jpg"
    assert r.n_points == 11
    assert r.src_kps[0].tolist() == [253.631662222222, 58.1813333333333]
    assert r.trg_kps[-1].tolist() == [231.41072, 86.1214285714286]
    assert r.trg_size == _size_for("2010_004184.jpg")
    assert r.pck_base == {"standard": max(_size_for("2010_004184.jpg")), "sd4match": 768.0}
    # boxes come from the .mat annotations when present
    assert r.trg_bbox == tuple(_mat_for("2010_004184.jpg")[1][0])
    with open(pascal_root / "test_pairs.csv") as fh:
        rows = list(csv.DictReader(fh))
    for rec, row in zip(recs, rows):
        assert rec.category == CLASSES[int(row["class"]) - 1]
        assert rec.trg_kps[:, 0].tolist() == [float(v) for v in row["XB"].split(";")]
        assert rec.trg_kps[:, 1].tolist() == [float(v) for v in row["YB"].split(";")]


def test_mat_keypoints_drop_nan_rows_pairwise(pascal_root):
    recs = open_dataset("pfpascal", pascal_root).pairs("val")
    with open(pascal_root / "val_pairs.csv") as fh:
        rows = list(csv.DictReader(fh))
    for rec, row in list(zip(recs, rows))[:40]:
        s, _ = _mat_for(row["source_image"].rsplit("/", 1)[1])
        t, tb = _mat_for(row["target_image"].rsplit("/", 1)[1])
        keep = ~np.isnan(s).any(1) & ~np.isnan(t).any(1)
        np.testing.assert_array_equal(rec.src_kps, s[keep])
        np.testing.assert_array_equal(rec.trg_kps, t[keep])
        assert rec.trg_bbox == tuple(tb[0])
        assert rec.meta["flip"] == int(row["flip"])


def test_flip_mirrors_points_and_boxes(pascal_root):
    ds = open_dataset("pfpascal", pascal_root)
    plain = ds.pairs("trn")
    flipped = ds.pairs("trn", apply_flip=True)
    n_flip = 0
    for a, b in zip(plain, flipped):
        if not a.meta["flip"]:
            np.testing.assert_array_equal(b.trg_kps, a.trg_kps)
            assert "mirrored" not in b.meta
            continue
        n_flip += 1
        W = a.trg_size[0]
        np.testing.assert_allclose(b.trg_kps[:, 0], W - a.trg_kps[:, 0])
        np.testing.assert_allclose(b.trg_kps[:, 1], a.trg_kps[:, 1])
        assert b.trg_bbox == (W - a.trg_bbox[2], a.trg_bbox[1], W - a.trg_bbox[0], a.trg_bbox[3])
        assert b.meta["mirrored"] is True
    assert n_flip > 1000  # about half of the 2,940 training pairs carry flip = 1


def test_mirrored_pixels_follow_points(pascal_root):
    from sd4match.data import load_pair_images

    ds = open_dataset("pfpascal", pascal_root)
    rec = next(r for r in ds.pairs("trn") if r.meta["flip"])
    img = Image.new("RGB", rec.src_size, (0, 0, 0))
    img.putpixel((3, 5), (255, 255, 255))
    img.save(pascal_root / rec.src)
    src, _ = load_pair_images(pascal_root, rec.mirrored())
    a = np.asarray(src)[..., 0]
    ys, xs = np.nonzero(a > 128)
    # pixel 3 covers [3, 4]; mirrored it covers [W - 4, W - 3], i.e. pixel W - 4
    assert (xs.tolist(), ys.tolist()) == ([rec.src_size[0] - 4], [5])


def test_train_pairs_name(tmp_path, pascal_lists):
    shutil.copy(pascal_lists / "trn_pairs.csv", tmp_path / "train_pairs.csv")
    (tmp_path / "PF-dataset-PASCAL").mkdir()
    ds = open_dataset("pfpascal", tmp_path)
    assert ds.split_file("trn").name == "train_pairs.csv"


def test_missing_mat_annotation(tmp_path, pascal_root):
    root = tmp_path / "p"
    shutil.copytree(pascal_root, root)
    victim = root / "PF-dataset-PASCAL/Annotations/cow/2009_004055.mat"
    if not victim.exists():  # find the .mat of the first val pair's source instead
        with open(root / "val_pairs.csv") as fh:
            row = next(csv.DictReader(fh))
        victim = root / "PF-dataset-PASCAL/Annotations" / CLASSES[int(row["class"]) - 1] / (row["source_image"].rsplit("/", 1)[1][:-4] + ".mat")
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim.name}: keypoint annotation \(\.mat\) is missing"):
        open_dataset("pfpascal", root).pairs("val")


def test_bad_class_index(tmp_path, pascal_root):
    root = tmp_path / "p"
    shutil.copytree(pascal_root, root)
    lines = (root / "val_pairs.csv").read_text().splitlines()
    cells = lines[2].split(",")
    cells[2] = "21"
    lines[2] = ",".join(cells)
    (root / "val_pairs.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val_pairs\.csv:3: class 21 is outside 1\.\.20"):
        open_dataset("pfpascal", root).pairs("val")
