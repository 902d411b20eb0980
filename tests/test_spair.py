"""SPair-71k reader on the real annotation files of the fixtures."""

import json

import pytest

from sd4match.data import open_dataset
from sd4match.errors import DataError


def test_first_test_pair_by_hand(spair_root):
    recs = open_dataset("spair", spair_root).pairs("test")
    r = recs[0]
    # values read off PairAnnotation/test/000001-2008_002719-2008_004100:aeroplane.json
    assert r.id == "000001-2008_002719-2008_004100:aeroplane"
    assert r.category == "aeroplane"
    assert r.src == "JPEGImages/aeroplane/2008_002719.jpg"
    assert r.trg == "JPEGImages/aeroplane/2008_004100.jpg"
    assert r.src_size == (500, 333) and r.trg_size == (500, 332)
    assert r.src_kps.tolist() == [[212, 153], [300, 130], [330, 127]]
    assert r.trg_kps.tolist() == [[39, 145], [364, 171], [416, 173]]
    assert r.src_bbox == (210, 34, 475, 250) and r.trg_bbox == (36, 92, 500, 200)
    # standard: max(w, h) of the target box = max(500 - 36, 200 - 92) = 464
    assert r.pck_base["standard"] == 464
    # sd4match: box in the 768 frame: max(464 * 768 / 500, 108 * 768 / 332) = 712.704
    assert r.pck_base["sd4match"] == pytest.approx(712.704)
    assert r.meta["truncation"] == 2 and r.meta["occlusion"] == 2
    assert r.meta["viewpoint_variation"] == 0 and r.meta["scale_variation"] == 0
    assert r.meta["mirror"] == 0 and r.meta["kps_ids"] == ["0", "7", "11"]


def test_every_fixture_pair_matches_raw_json(spair_root):
    ds = open_dataset("spair", spair_root)
    for split, n in (("trn", 2), ("val", 1), ("test", 27)):
        recs = ds.pairs(split)
        assert len(recs) == n
        listed = (spair_root / "Layout/large" / f"{split}.txt").read_text().split()
        assert [r.id for r in recs] == listed  # official order kept
        for r in recs:
            raw = json.loads((spair_root / "PairAnnotation" / split / f"{r.id}.json").read_text())
            assert r.src_kps.tolist() == raw["src_kps"] and r.trg_kps.tolist() == raw["trg_kps"]
            assert list(r.src_size) == raw["src_imsize"][:2] and list(r.trg_size) == raw["trg_imsize"][:2]
            x1, y1, x2, y2 = raw["trg_bndbox"]
            W, H = raw["trg_imsize"][:2]
            assert r.pck_base["standard"] == max(x2 - x1, y2 - y1)
            assert r.pck_base["sd4match"] == pytest.approx(max((x2 - x1) * 768 / W, (y2 - y1) * 768 / H))
            for k in ("viewpoint_variation", "scale_variation", "truncation", "occlusion", "mirror"):
                assert r.meta[k] == raw[k]


def test_single_keypoint_pair_is_kept(spair_root):
    recs = open_dataset("spair", spair_root).pairs("test")
    assert min(r.n_points for r in recs) >= 1
    assert all(r.src_kps.shape == r.trg_kps.shape for r in recs)


def test_annotation_missing_key(tmp_path, spair_root):
    import shutil

    root = tmp_path / "SPair-71k"
    shutil.copytree(spair_root, root)
    f = root / "PairAnnotation/val/000406-2008_006813-2010_000401:bicycle.json"
    ann = json.loads(f.read_text())
    del ann["trg_kps"]
    f.write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"000406-2008_006813-2010_000401:bicycle\.json: missing key 'trg_kps'"):
        open_dataset("spair", root).pairs("val")


def test_wrong_layout_names_root(tmp_path):
    (tmp_path / "SPair-71k").mkdir()
    with pytest.raises(DataError, match="not a SPair-71k root.*SPair-71k/ subfolder"):
        open_dataset("spair", tmp_path)


def test_unknown_split(spair_root):
    with pytest.raises(DataError, match="no split 'train'"):
        open_dataset("spair", spair_root).pairs("train")
