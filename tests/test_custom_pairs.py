"""`--dataset custom`: your own annotated pairs as JSON Lines (the `pairs` export format)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from sd4match.cli import main
from sd4match.data import open_dataset

from conftest import stand_in_image


def _export(argv, path: Path) -> None:
    assert main(["pairs", *argv, "--out", str(path)]) == 0


def test_an_exported_split_reads_back_and_evaluates_as_the_benchmark_does(willow_root, tmp_path, capsys):
    """PF-Willow's test split written by `sd4match pairs` into a custom root (its pictures
    linked in) reads back as the same records, and `evaluate` on it gives the very
    predictions and score of `--dataset pfwillow`: the custom reader adds nothing and
    loses nothing."""
    root = tmp_path / "mine"
    root.mkdir()
    (root / "PF-dataset").symlink_to(willow_root / "PF-dataset", target_is_directory=True)
    _export(["--dataset", "pfwillow", "--root", str(willow_root), "--split", "test"], root / "test.jsonl")
    _export(["--dataset", "custom", "--root", str(root), "--split", "test"], tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == (root / "test.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["datasets", "check", "--dataset", "custom", "--root", str(root)]) == 0  # the splits it holds; trn and val are not missing
    out = capsys.readouterr().out
    assert "test  450 pairs" in out and "trn" not in out and "problem" not in out
    common = ["--split", "test", "--model", "effnet-lite0", "--resolution", "128", "--limit", "10", "--match", "nn", "--device", "cpu", "--no-progress"]
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), *common, "--out", str(tmp_path / "willow")]) == 0
    assert main(["evaluate", "--dataset", "custom", "--root", str(root), *common, "--out", str(tmp_path / "custom")]) == 0
    assert (tmp_path / "custom" / "predictions.jsonl").read_bytes() == (tmp_path / "willow" / "predictions.jsonl").read_bytes()
    a, b = (json.loads((tmp_path / d / "score.json").read_text()) for d in ("willow", "custom"))
    assert a["per_image"] == b["per_image"] and a["per_point"] == b["per_point"] and a["n_pairs"] == b["n_pairs"] == 10


def test_the_least_a_pair_needs_and_what_is_made_for_the_rest(tmp_path, capsys):
    """src, trg and the points are enough: the id is the pair's index, the category the
    source's folder, the sizes the pictures' own, and the PCK base max(w, h) of the target
    box when given, else max(W, H) of the target picture; by hand below. Scored against its
    own ground truth, every point is correct."""
    root = tmp_path / "mine"
    stand_in_image(root / "cats" / "a.jpg", (300, 200))
    stand_in_image(root / "cats" / "b.jpg", (250, 400))
    lines = [{"src": "cats/a.jpg", "trg": "cats/b.jpg", "src_kps": [[10, 20], [30, 40]], "trg_kps": [[5, 6], [7, 8]]},
             {"id": "x", "category": "dog", "src": "cats/b.jpg", "trg": "cats/a.jpg", "src_kps": [[1, 2]], "trg_kps": [[3, 4]],
              "trg_bbox": [10, 20, 110, 70]}]
    (root / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    r0, r1 = open_dataset("custom", root).pairs("test")
    assert (r0.id, r0.category, r0.src_size, r0.trg_size) == ("0", "cats", (300, 200), (250, 400))
    assert r0.pck_base == {"standard": 400.0, "sd4match": 768.0}  # max(W, H) of the target; the frame's side
    assert (r1.id, r1.category, r1.trg_bbox) == ("x", "dog", (10.0, 20.0, 110.0, 70.0))
    assert r1.pck_base == {"standard": 100.0, "sd4match": 256.0}  # max(100, 50); max(100 * 768 / 300, 50 * 768 / 200)
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps({"id": r.id, "kps": r.trg_kps.tolist()}) + "\n" for r in (r0, r1)))
    assert main(["score", "--dataset", "custom", "--root", str(root), "--split", "test", "--predictions", str(tmp_path / "preds.jsonl"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_pairs"] == 2 and res["per_image"]["all"]["0.1"] == 1.0
    assert "by_keypoint" not in res  # the pairs do not number their keypoints: asking is one line
    assert main(["score", "--dataset", "custom", "--root", str(root), "--split", "test", "--predictions", str(tmp_path / "preds.jsonl"),
                 "--by-keypoint"]) == 2
    assert "--by-keypoint: custom's pairs do not number their keypoints" in capsys.readouterr().err
    lines[0]["meta"], lines[1]["meta"] = {"kps_ids": ["eye", "nose"]}, {"kps_ids": ["eye"]}  # your own ids: pooled per category
    (root / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    assert main(["score", "--dataset", "custom", "--root", str(root), "--split", "test", "--predictions", str(tmp_path / "preds.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_keypoint"] == {"cats": {"eye": {"n_points": 1, "0.05": 1.0, "0.1": 1.0, "0.15": 1.0},
                                                                          "nose": {"n_points": 1, "0.05": 1.0, "0.1": 1.0, "0.15": 1.0}},
                                                                 "dog": {"eye": {"n_points": 1, "0.05": 1.0, "0.1": 1.0, "0.15": 1.0}}}


def test_mistakes_in_a_pair_list_are_one_line_naming_the_line(tmp_path, capsys):
    root = tmp_path / "mine"
    stand_in_image(root / "a.jpg", (300, 200))
    stand_in_image(root / "b.jpg", (250, 400))
    good = {"src": "a.jpg", "trg": "b.jpg", "src_kps": [[10, 20]], "trg_kps": [[5, 6]]}
    list_file = root / "test.jsonl"
    for bad, problem in (
        ({"src": "a.jpg", "trg": "b.jpg", "src_kps": [[10, 20]]}, "missing key 'trg_kps' (a pair needs src, trg, src_kps, trg_kps)"),
        ({**good, "trg_kps": [[5, 6], [7, 8]]}, "src_kps has 1 points but trg_kps 2: row i of one is the match of row i of the other"),
        ({**good, "trg_kps": [[400, 5]]}, "trg_kps[0] = [400.0, 5.0] lies outside the 250x400 picture b.jpg (points are [x, y] in its stored pixels)"),
        # [-1, -1], a hidden point in many annotation files, was within the 1-pixel margin and scored as a position
        ({**good, "src_kps": [[-1, -1]]}, "src_kps[0] = [-1.0, -1.0] lies outside the 300x200 picture a.jpg (points are [x, y] in its stored "
                                          "pixels; a hidden point is left out of both lists, not marked -1)"),
        ({**good, "trg_bbox": [10, 20, 5, 70]}, "trg_bbox is [10, 20, 5, 70], expected [x1, y1, x2, y2] with x2 > x1 and y2 > y1"),
        ({**good, "id": "0"}, "pair id '0' is given twice (first at {list_file}:1); predictions are matched to pairs by id"),
        ({**good, "meta": [1]}, "meta must be a JSON object, not a list"),
        ({**good, "meta": {"geo_aware": [True, False]}}, "pair '1': meta.geo_aware must be a list of 1 true/false values, one per keypoint"),
        ({**good, "meta": {"geo_twins": []}}, "pair '1': meta.geo_twins must be a list of 1 lists of [x, y], one per keypoint"),
        ({**good, "meta": {"kps_ids": [3, 4]}}, "pair '1': meta.kps_ids must be a list of 1 keypoint ids, one per keypoint"),
    ):
        list_file.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        assert main(["pairs", "--dataset", "custom", "--root", str(root), "--split", "test"]) == 2
        assert capsys.readouterr().err.strip() == f"sd4match: error: {list_file}:2: {problem.format(list_file=list_file)}"
    list_file.write_text(json.dumps({**good, "src_kps": [[-0.5, 200.9]]}) + "\n")  # an annotation's rounding past the edge: kept
    assert main(["pairs", "--dataset", "custom", "--root", str(root), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["src_kps"] == [[-0.5, 200.9]]
    assert main(["pairs", "--dataset", "custom", "--root", str(tmp_path), "--split", "test"]) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: {tmp_path}: not a custom pair root: expected trn.jsonl, val.jsonl or test.jsonl "
                                               "in it (`sd4match pairs --out` writes one)")
    assert main(["pairs", "--dataset", "custom", "--root", str(list_file), "--split", "test"]) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: {list_file}: a file: --root is the folder that holds the pair lists, named "
                                               "trn.jsonl, val.jsonl or test.jsonl (picture paths relative to it)")
    # a phone picture turned by its EXIF tag: the points would be read in pixels other than those shown
    turned = Image.open(root / "b.jpg")
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(root / "phone.jpg", exif=exif)
    list_file.write_text(json.dumps({**good, "trg": "phone.jpg"}) + "\n")
    assert main(["pairs", "--dataset", "custom", "--root", str(root), "--split", "test"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sd4match: error: {root / 'phone.jpg'}: its EXIF orientation (6) turns it when shown, but points are read in its stored pixels: "
        "save it upright (e.g. PIL's ImageOps.exif_transpose) and give the points there")
    # with its size given, the pair says which pixels it means: read as given
    list_file.write_text(json.dumps({**good, "trg": "phone.jpg", "trg_size": [250, 400]}) + "\n")
    assert main(["pairs", "--dataset", "custom", "--root", str(root), "--split", "test"]) == 0
    with pytest.raises(Exception, match="no split 'train'"):
        open_dataset("custom", root).pairs("train")


def test_training_on_your_own_pairs_without_a_validation_list_names_the_two_ways_on(willow_root, tmp_path, capsys, no_model_load):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "PF-dataset").symlink_to(willow_root / "PF-dataset", target_is_directory=True)
    _export(["--dataset", "pfwillow", "--root", str(willow_root), "--split", "test"], root / "trn.jsonl")
    capsys.readouterr()
    assert main(["train", "--dataset", "custom", "--root", str(root), "--prompt", "single", "--model", "effnet-lite0", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: {root}: no pair list for the validation split 'val' (val.jsonl is missing): "
                                               "validate on another split with --val-split, or not at all with --val-every 0")



def test_spair_pairs_exported_keep_their_geometry_aware_points(spair_root, tmp_path, capsys):
    """`sd4match pairs` writes each pair's geometry-aware points (meta.geo_aware); read back
    as a custom root, `score` gives the same subset, to the digit."""
    from sd4match.metrics import score

    _export(["--dataset", "spair", "--root", str(spair_root), "--split", "test"], tmp_path / "all.jsonl")
    lines = [line for line in (tmp_path / "all.jsonl").read_text().splitlines() if "geo_aware" in line]
    assert len(lines) == 7  # the pairs whose target's image annotation is in the fixtures
    root = tmp_path / "mine"
    root.mkdir()
    (root / "test.jsonl").write_text("".join(line + "\n" for line in lines))
    recs = [r for r in open_dataset("spair", spair_root).pairs("test") if "geo_aware" in r.meta]
    preds = {r.id: r.trg_kps + [[0.07 * r.pck_base["standard"] * (i % 3), 0] for i in range(r.n_points)] for r in recs}
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps({"id": k, "kps": v.tolist()}) + "\n" for k, v in preds.items()))
    assert main(["score", "--dataset", "custom", "--root", str(root), "--split", "test", "--predictions", str(tmp_path / "preds.jsonl"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads(json.dumps(score(recs, preds)))
    assert got["geo_aware"] == want["geo_aware"] == {"n_pairs": 5, "n_points": 26}
    for agg in ("per_image", "per_point"):
        assert got[agg]["geo_aware"] == want[agg]["geo_aware"]
        assert 0 < got[agg]["geo_aware"]["all"]["0.1"] < 1  # the test can tell a subset from all or nothing


# -- your own pairs from a COCO keypoints file (datasets prepare custom) -----------------------


def _coco_folder(tmp_path, willow_root):
    """Seven car pictures and a duck one, a COCO file as CVAT exports it: a 'car' skeleton of
    three points (some unlabelled), a 'duck' one, and a box-only 'sign' label."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cars = sorted((willow_root / "PF-dataset" / "car(S)").glob("*.png"))[:7]
    duck = sorted((willow_root / "PF-dataset" / "duck(S)").glob("*.png"))[0]
    for f in [*cars, duck]:
        (photos / f.name).write_bytes(f.read_bytes())
    images = [{"id": i + 1, "file_name": f.name, "width": Image.open(f).width, "height": Image.open(f).height} for i, f in enumerate([*cars, duck])]
    vis = [[2, 2, 2], [2, 0, 2], [2, 2, 0], [0, 1, 2], [2, 2, 2], [0, 0, 2], [2, 2, 2]]  # car i's v per point (cars 2 and 5 share none)
    anns = []
    for i, v in enumerate(vis):
        pts = [(10 + 5 * i, 20), (50, 30 + 3 * i), (90, 60)]
        anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1, "bbox": [5, 10, 100 + i, 80], "area": 1,
                     "keypoints": [c for (x, y), vv in zip(pts, v) for c in ((x, y, vv) if vv else (0, 0, 0))], "num_keypoints": sum(map(bool, v))})
    anns.append({"id": 200, "image_id": 8, "category_id": 2, "bbox": [0, 0, 50, 50], "keypoints": [20, 20, 2, 30, 30, 2]})
    anns.append({"id": 300, "image_id": 1, "category_id": 3, "bbox": [0, 0, 9, 9], "segmentation": []})
    cats = [{"id": 1, "name": "car", "keypoints": ["wheel", "door", "roof"], "skeleton": []},
            {"id": 2, "name": "duck", "keypoints": ["beak", "tail"], "skeleton": []}, {"id": 3, "name": "sign"}]
    coco = photos / "annotations.json"
    coco.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return coco, vis, anns, {im["id"]: im["file_name"] for im in images}


def test_prepare_custom_pairs_from_a_coco_file(tmp_path, willow_root, capsys):
    """Each category's pictures split apart (seeded), every two instances of a category within
    a split a pair of the points labelled in both (worked out here from the v's), boxes as
    [x1, y1, x2, y2], picture paths relative to the new root; read back as --dataset custom."""
    coco, vis, anns, files = _coco_folder(tmp_path, willow_root)
    root = tmp_path / "mine"
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(root), "--val", "0", "--test", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "custom at" in err and "trn" in err and "test" in err
    splits = {s: [json.loads(l) for l in (root / f"{s}.jsonl").read_text().splitlines()] for s in ("trn", "test")}
    assert not (root / "val.jsonl").exists()  # a share of 0: no val
    pics = {s: {p[k] for p in ps for k in ("src", "trg")} for s, ps in splits.items()}
    assert len(pics["test"]) == 2 and len(pics["trn"]) == 5 and not pics["test"] & pics["trn"]  # round(0.3 * 7) = 2 cars; the duck has no partner
    name_of = {a["id"]: a for a in anns}
    for split, pairs in splits.items():
        cars = sorted(a["id"] for a in anns if a["category_id"] == 1 and f"../photos/{files[a['image_id']]}" in pics[split])
        want = [(i, j) for k, i in enumerate(cars) for j in cars[k + 1:] if any(vis[i - 100][t] and vis[j - 100][t] for t in range(3))]
        assert [p["id"] for p in pairs] == [f"{i}-{j}" for i, j in want]
        for p, (i, j) in zip(pairs, want):
            common = [t for t in range(3) if vis[i - 100][t] and vis[j - 100][t]]
            a, b = name_of[i], name_of[j]
            assert p["category"] == "car" and p["src"] == f"../photos/{files[a['image_id']]}" and p["trg"] == f"../photos/{files[b['image_id']]}"
            assert p["src_kps"] == [a["keypoints"][3 * t:3 * t + 2] for t in common] and p["trg_kps"] == [b["keypoints"][3 * t:3 * t + 2] for t in common]
            assert p["meta"] == {"kps_ids": [["wheel", "door", "roof"][t] for t in common]}
            assert p["trg_bbox"] == [5, 10, 5 + b["bbox"][2], 90]
    recs = open_dataset("custom", root).pairs("trn")
    assert [r.id for r in recs] == [p["id"] for p in splits["trn"]] and recs[0].pck_base["standard"] == max(splits["trn"][0]["trg_bbox"][2] - 5, 80)
    # the same seed makes the same lists; another root for another seed
    again = tmp_path / "again"
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(again), "--val", "0", "--test", "0.3"]) == 0
    assert all((again / f).read_bytes() == (root / f).read_bytes() for f in ("trn.jsonl", "test.jsonl"))
    # refusals, each one line and nothing written
    capsys.readouterr()
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(root)]) == 2
    assert "already holds trn.jsonl; choose an empty --root" in capsys.readouterr().err
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(tmp_path / "x"), "--val", "0.5", "--test", "0.5"]) == 2
    assert "together below 1" in capsys.readouterr().err and not (tmp_path / "x").exists()
    bad = json.loads(coco.read_text())
    bad["annotations"][0]["keypoints"][0] = 5000  # a point outside its picture: read back as --dataset custom reads it
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["datasets", "prepare", "custom", "--from", str(tmp_path / "bad.json"), "--images", str(tmp_path / "photos"), "--root", str(tmp_path / "z")]) == 2
    assert "lies outside the" in capsys.readouterr().err and not list((tmp_path / "z").glob("*.jsonl"))
    (tmp_path / "photos" / files[3]).unlink()
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(tmp_path / "y")]) == 2
    assert f"{files[3]}: missing (annotated in {coco}" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_prepare_custom_without_boxes_scores_against_the_picture(tmp_path, willow_root, capsys):
    """--no-boxes: no box written, so the PCK base is max(W, H) of the target picture (and
    ap10k's --copy is said to change nothing)."""
    coco, vis, *_ = _coco_folder(tmp_path, willow_root)
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(tmp_path / "r"), "--val", "0", "--test", "0", "--no-boxes",
                 "--copy"]) == 0
    assert "sd4match: warning: --copy changes nothing for custom" in capsys.readouterr().err
    recs = open_dataset("custom", tmp_path / "r").pairs("trn")
    assert len(recs) == 21 - 1  # every two of the 7 cars but the two that share no labelled point
    assert all(r.trg_bbox is None and r.pck_base["standard"] == max(r.trg_size) for r in recs)
    # --max-pairs: a seeded draw of that many, in the list's order
    assert main(["datasets", "prepare", "custom", "--from", str(coco), "--root", str(tmp_path / "r5"), "--val", "0", "--test", "0", "--max-pairs", "5"]) == 0
    few = [r.id for r in open_dataset("custom", tmp_path / "r5").pairs("trn")]
    assert len(few) == 5 and few == [r.id for r in recs if r.id in few]
