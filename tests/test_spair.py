"""SPair-71k reader on the real annotation files of the fixtures."""

import json

import numpy as np
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


# Geometry-aware points (GeoAware-SC, "Telling Left from Right"): a pair's point whose group
# of mirrored keypoints has at least two members visible in the target picture. The masks
# below are worked out by hand from the pair files (kps_ids), the target pictures' image
# annotations (the slots that are not null) and GeoAware-SC's SPAIR_GEO_AWARE groups.
GEO_BY_HAND = {
    # target shows slots 0 1 2 7 11; 0 has no twin, 7's twin 6 and 11's twin 10 are not shown
    "000001-2008_002719-2008_004100:aeroplane": [False, False, False],
    # target shows 3 4 5 8 9 15-21 23 24; 3 has no twin; 5 and its twin 4 are both shown
    "000715-2011_002552-2011_002222:aeroplane": [False, True],
    # slots 1 (a wheel) and 13 have no twin in the bicycle's groups
    "000718-2008_002515-2008_003395:bicycle": [False, False],
    # 0 3 4 6 7 have no twin; 10/11, 12/13, 14/15 are twins all shown
    "002120-2010_004953-2010_004521:bird": [False, False, False, False, False, True, True, True, True, True, True],
    # target shows 0 10-16 18: 0's twin 1 missing; {10,13}, {11,14}, {12,15} shown; 16's group
    # (16 17 26 27) and 18's (18 19 28 29) have one member shown
    "004420-2011_002687-2011_002079:bus": [False, True, True, True, True, True, True, False, False],
    # target shows 0 6 10-16 18 26 28: 6's group (2 3 6 7) has one; {11,14}, {16,26}, {18,28}
    "004423-2008_000052-2008_005638:car": [False, True, True, True, True],
    # target shows 0-6 8 9: {0,1}, {2,3}, {4,5,6}, {8,9}
    "005637-2008_000089-2008_001467:chair": [True] * 9,
}


def test_geometry_aware_points_by_hand(spair_root):
    recs = open_dataset("spair", spair_root).pairs("test")
    got = {r.id: r.meta["geo_aware"] for r in recs if "geo_aware" in r.meta}
    # only the pairs whose target picture's image annotation is in the fixtures
    assert got == GEO_BY_HAND


def test_geometry_aware_pck_by_hand(spair_root):
    from sd4match.metrics import format_table, score

    recs = [r for r in open_dataset("spair", spair_root).pairs("test") if r.id in GEO_BY_HAND]
    preds = {r.id: r.trg_kps.copy() for r in recs}
    far = lambda r, i: preds[r.id].__setitem__((i, 0), r.trg_kps[i, 0] + 0.2 * r.pck_base["standard"])  # noqa: E731
    by_id = {r.id: r for r in recs}
    chair, bus = by_id["005637-2008_000089-2008_001467:chair"], by_id["004420-2011_002687-2011_002079:bus"]
    for i in (0, 4, 8):
        far(chair, i)  # three geometry-aware points wrong
    far(bus, 0)  # not geometry-aware
    far(bus, 1)  # geometry-aware
    got = score(recs, preds, alphas=(0.1,))
    # 26 geometry-aware points in 5 pairs (1 + 6 + 6 + 4 + 9); 4 of them wrong
    assert got["geo_aware"] == {"n_pairs": 5, "n_points": 26}
    assert got["per_point"]["geo_aware"]["all"]["0.1"] == pytest.approx(22 / 26)
    # per image: the mean over the 5 pairs of the share of their geometry-aware points correct
    assert got["per_image"]["geo_aware"]["all"]["0.1"] == pytest.approx((1 + 1 + 5 / 6 + 1 + 6 / 9) / 5)
    assert got["per_image"]["geo_aware"]["by_category"] == {
        "aeroplane": {"0.1": 1.0}, "bird": {"0.1": 1.0}, "bus": {"0.1": pytest.approx(5 / 6)}, "car": {"0.1": 1.0},
        "chair": {"0.1": pytest.approx(6 / 9)}}  # the bicycle pair has none
    # the whole set is unchanged: 41 points, 5 wrong
    assert got["per_point"]["all"]["0.1"] == pytest.approx(36 / 41)
    table = format_table(got)
    assert "geo-aware subset (5 pairs, 26 points)" in table and f"{100 * 22 / 26:7.2f}" in table
    # a pair set where some pairs cannot tell their geometry-aware points has no such subset
    everything = open_dataset("spair", spair_root).pairs("test")
    assert "geo_aware" not in score(everything, {r.id: r.trg_kps for r in everything})


def test_a_broken_image_annotation_is_one_line(tmp_path, spair_root):
    import shutil

    root = tmp_path / "SPair-71k"
    shutil.copytree(spair_root, root)
    f = root / "ImageAnnotation/bus/2011_002079.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "kps": [[1, 2]]}))
    with pytest.raises(DataError, match=r"2011_002079\.json: kps is not a mapping of keypoint slot"):
        open_dataset("spair", root).pairs("test")


def test_a_prediction_on_a_mirrored_twin_is_counted_as_one(spair_root):
    """``twin_swaps``: the share of geometry-aware points predicted wrong *on one of their
    twins* (within α·b of where a mirrored keypoint is in the target): the left-right
    confusion itself. Twins come from the target's image annotation."""
    from sd4match.metrics import format_table, score

    recs = [r for r in open_dataset("spair", spair_root).pairs("test") if r.id in GEO_BY_HAND]
    by_id = {r.id: r for r in recs}
    chair, bus = by_id["005637-2008_000089-2008_001467:chair"], by_id["004420-2011_002687-2011_002079:bus"]
    # the target's image annotation: the chair's slot 0 has its twin, slot 1, at (102, 188)
    assert chair.meta["geo_twins"][0] == [[102.0, 188.0]] and chair.meta["geo_twins"][4] == [[102.0, 258.0], [115.0, 242.0]]
    assert all(bool(t) == g for r in recs for t, g in zip(r.meta["geo_twins"], r.meta["geo_aware"]))  # twins exactly where geometry-aware
    preds = {r.id: r.trg_kps.copy() for r in recs}
    preds[chair.id][0] = [102.0, 188.0]  # on its twin
    assert np.linalg.norm(chair.trg_kps[0] - [102, 188]) > 0.1 * chair.pck_base["standard"]  # and so wrong
    preds[bus.id][1] = bus.trg_kps[1] + [0, 0.5 * bus.pck_base["standard"]]  # wrong, on no twin
    for protocol in ("standard", "sd4match"):
        got = score(recs, preds, protocol=protocol, alphas=(0.1,))
        assert got["per_point"]["geo_aware"]["all"]["0.1"] == pytest.approx(24 / 26)
        assert got["per_point"]["geo_aware"]["twin_swaps"]["0.1"] == pytest.approx(1 / 26)
        assert got["per_image"]["geo_aware"]["twin_swaps"]["0.1"] == pytest.approx((1 / 9) / 5)  # the chair's 1 of 9, over 5 pairs
    assert "  of them on a mirrored twin" in format_table(got)


def test_pck_per_keypoint_by_hand(spair_root, tmp_path, capsys):
    """``by_keypoint``: each keypoint id's points pooled over its category's pairs. The three
    bottle pairs name ids 0-9; 1, 3-6 and 0, 1, 4-7: id 1 is in all three, id 4 too, id 0 in
    the first and the last, id 2 in the first only."""
    from sd4match.cli import main
    from sd4match.metrics import pair_details, score

    recs = open_dataset("spair", spair_root).pairs("test")
    preds = {r.id: r.trg_kps.copy() for r in recs}
    bottles = [r for r in recs if r.category == "bottle"]
    assert [r.meta["kps_ids"] for r in bottles] == [[str(i) for i in range(10)], ["1", "3", "4", "5", "6"], ["0", "1", "4", "5", "6", "7"]]
    for r, kp in ((bottles[0], "1"), (bottles[2], "1"), (bottles[1], "4")):  # wrong by 0.2 b
        i = r.meta["kps_ids"].index(kp)
        preds[r.id][i, 0] += 0.2 * r.pck_base["standard"]
    got = score(recs, preds, alphas=(0.1,))["by_keypoint"]
    assert got["bottle"]["1"] == {"n_points": 3, "0.1": pytest.approx(1 / 3)}
    assert got["bottle"]["4"] == {"n_points": 3, "0.1": pytest.approx(2 / 3)}
    assert got["bottle"]["0"] == {"n_points": 2, "0.1": 1.0} and got["bottle"]["2"] == {"n_points": 1, "0.1": 1.0}
    assert list(got["bottle"]) == [str(i) for i in range(10)]  # numeric order
    assert got["aeroplane"]["11"]["n_points"] == 2 and set(got) == {r.category for r in recs}
    assert sum(v["n_points"] for kps in got.values() for v in kps.values()) == sum(r.n_points for r in recs)
    assert pair_details(bottles[1:2], preds)[0]["keypoints"] == ["1", "3", "4", "5", "6"]
    # on the command line
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": k, "kps": v.tolist()}) + "\n" for k, v in preds.items()))
    assert main(["score", "--dataset", "spair", "--root", str(spair_root), "--split", "test", "--predictions", str(path),
                 "--alphas", "0.1", "--by-keypoint"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("[bottle]"):].split("\n\n")[0].splitlines()
    assert block[2].split() == ["0", "2", "100.00"] and block[3].split() == ["1", "3", f"{100 / 3:.2f}"]
