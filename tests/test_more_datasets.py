"""AP-10K, SPair-U, CUB-200-2011 and MP-100 readers on the real fixture files, with PCK
computed by hand from the raw annotation values."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sd4match.cli import main
from sd4match.data import open_dataset, prepare_ap10k
from sd4match.errors import DataError
from sd4match.metrics import score

from conftest import fixture_dir, stand_in_image


def one_line_error(capsys, args, *fragments):
    assert main(list(map(str, args))) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd4match: error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def moved(rec, k: int, alpha: float = 0.1):
    """Predictions equal to the target points, the first ``k`` moved just past alpha x base."""
    pred = rec.trg_kps.copy()
    pred[:k, 0] += alpha * rec.pck_base["standard"] * 1.01
    return pred


# ------------------------------------------------------------------------------ AP-10K
@pytest.fixture
def ap10k_download(tmp_path):
    """The official AP-10K test fixture as a download (annotations/ + data/). It holds two
    pictures of two species; each is given twice more under new ids (stand-in copies of the
    real picture and its real annotation) so that pairs of one species exist."""
    fx = fixture_dir("ap-10k")
    d = tmp_path / "ap10k-download"
    (d / "annotations").mkdir(parents=True)
    (d / "data").mkdir()
    coco = json.loads((fx / "test_ap10k.json").read_text())
    images, anns = [], []
    for im, a in zip(coco["images"], coco["annotations"]):
        for k in range(3):
            new = im["id"] * 10 + k
            images.append({**im, "id": new, "file_name": f"{new:012d}.jpg"})
            anns.append({**a, "id": a["id"] * 10 + k, "image_id": new})
            shutil.copy(fx / im["file_name"], d / "data" / f"{new:012d}.jpg")
    (d / "annotations" / "ap10k-test-split1.json").write_text(json.dumps({**coco, "images": images, "annotations": anns}))
    for s in ("train", "val"):
        (d / "annotations" / f"ap10k-{s}-split1.json").write_text(json.dumps({**coco, "images": [], "annotations": []}))
    shutil.copy(fx / "ap-10k_is_crowd.txt", d)
    return d, coco


def test_ap10k_prepared_from_the_official_fixture_by_hand(ap10k_download, tmp_path):
    d, coco = ap10k_download
    root = tmp_path / "ap-10k"
    counts = prepare_ap10k(d, root)
    # 3 antelope and 3 jaguar pictures, all test (fewer than 30 a species): C(3, 2) pairs each; 3 x 3 across the families
    assert counts["test"] == 6 and counts["test_cross_family"] == 9 and counts["trn"] == counts["val"] == 0
    assert counts["test_cross_species"] == 0  # Bovidae and Felidae each have one species here
    ds = open_dataset("ap10k", root)
    test = ds.pairs("test")
    jaguar = next(r for r in test if r.category == "jaguar")
    raw = next(a for a in coco["annotations"] if a["image_id"] == 37516)  # the jaguar's real annotation
    kps = np.asarray(raw["keypoints"], dtype=float).reshape(-1, 3)
    vis = kps[:, 2] > 0
    assert jaguar.n_points == vis.sum() == 16  # keypoint 2 (right_eye) is unlabelled: dropped from both
    np.testing.assert_array_equal(jaguar.trg_kps, kps[vis, :2])
    x, y, w, h = raw["bbox"]  # [66, 192, 1092, 512]
    assert jaguar.trg_bbox == (x, y, x + w, y + h) and jaguar.pck_base["standard"] == max(w, h) == 1092
    assert jaguar.trg_size == (1200, 867) and jaguar.src.startswith("JPEGImages/Felidae/jaguar/")
    assert jaguar.meta["groups"] == {"family": "Felidae", "species": "jaguar"}
    # geometry-aware points (GeoAware-SC's AP10K_GEO_AWARE: shoulders 5/8, elbows and knees
    # 6/9/12/15, paws 7/10/13/16, hips 11/14): every group is shown in the target, so its
    # 12 members are; the left eye, nose, neck and tail root (0, 2, 3, 4) have no twin there
    assert jaguar.meta["kps_ids"] == [0] + list(range(2, 17))  # the right eye (index 1) unlabelled
    assert jaguar.meta["geo_aware"] == [False] * 4 + [True] * 12
    # where a point's twins are in the target: the left shoulder's (5) is the right shoulder (8); a knee's (12) the others of 6/9/12/15
    assert jaguar.meta["geo_twins"][4] == [kps[8, :2].tolist()] and jaguar.meta["geo_twins"][11] == kps[[6, 9, 15], :2].tolist()
    assert jaguar.meta["geo_twins"][:4] == [[]] * 4
    # PCK by hand: 4 of 16 points moved past 0.1 x 1092 -> 12/16 of that pair
    preds = {r.id: r.trg_kps.copy() for r in test}
    preds[jaguar.id] = moved(jaguar, 4)
    got = score(test, preds, alphas=(0.1,))
    assert got["per_point"]["all"]["0.1"] == pytest.approx((6 * 16 - 4) / (6 * 16))
    assert got["per_image"]["by_species"]["jaguar"]["0.1"] == pytest.approx((2 + 12 / 16) / 3)
    assert got["per_image"]["by_family"]["Bovidae"]["0.1"] == 1.0
    # keypoints by name: AP-10K's own list (its categories' "keypoints"), shown beside each id
    from sd4match.metrics import keypoint_names, keypoint_table

    assert ds.keypoint_names == {str(i): n for i, n in enumerate(coco["categories"][0]["keypoints"])}
    names = keypoint_names(got, "ap10k")
    assert names["7"] == "left_front_paw" and "1" not in names and list(names)[:3] == ["0", "2", "3"]  # the right eye is never labelled here
    assert "7 left_front_paw" in keypoint_table({**got, "keypoint_names": names}) and keypoint_names(got, "spair") == {}
    cross = ds.pairs("test_cross_family")
    assert {r.category for r in cross} == {"all"} and all(r.meta["groups"] == {"family": "cross-family"} for r in cross)
    assert prepare_ap10k(d, tmp_path / "again") == counts  # deterministic: the same pairs again
    assert sorted(p.name for p in (tmp_path / "again/PairAnnotation/test").iterdir()) == sorted(p.name for p in (root / "PairAnnotation/test").iterdir())


def test_ap10k_reads_a_tree_built_by_geoaware_or_marco(ap10k_download, tmp_path):
    """Their ``*_json_path`` are relative to their working folder (data/ap-10k/...) or absolute."""
    d, _ = ap10k_download
    root = tmp_path / "ap-10k"
    prepare_ap10k(d, root)
    ours = [r.to_json() for r in open_dataset("ap10k", root).pairs("test")]
    for i, f in enumerate(sorted((root / "PairAnnotation/test").glob("*.json"))):
        pair = json.loads(f.read_text())
        if i % 2:
            pair = {k: f"data/ap-10k/{v}" for k, v in pair.items()}  # GeoAware-SC's notebook, run from its repository
        else:
            pair = {k: str(root / v) for k, v in pair.items()}  # absolute
        f.write_text(json.dumps(pair))
    assert [r.to_json() for r in open_dataset("ap10k", root).pairs("test")] == ours


def test_ap10k_wrong_layouts_are_one_line(ap10k_download, tmp_path, capsys):
    d, _ = ap10k_download
    one_line_error(capsys, ["pairs", "--dataset", "ap10k", "--root", d, "--split", "test"], "sd4match datasets prepare ap10k")
    (d / "ap-10k_is_crowd.txt").unlink()
    one_line_error(capsys, ["datasets", "prepare", "ap10k", "--from", d, "--root", tmp_path / "out"], "ap-10k_is_crowd.txt", "GeoAware-SC")
    root = tmp_path / "ap-10k"
    assert main(["datasets", "prepare", "ap10k", "--from", str(d), "--root", str(root), "--crowd", str(fixture_dir("ap-10k") / "ap-10k_is_crowd.txt")]) == 0
    assert "test 6 pairs" in capsys.readouterr().err
    assert main(["datasets", "check", "--dataset", "ap10k", "--root", str(root), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "test  6 pairs (antelope 3, jaguar 3)" in out and "by family: Bovidae 3, Felidae 3" in out
    shutil.rmtree(root / "JPEGImages")
    one_line_error(capsys, ["datasets", "check", "--dataset", "ap10k", "--root", root], "JPEGImages: missing")


# ------------------------------------------------------------------------------ CUB-200-2011
@pytest.fixture
def cub_root(tmp_path):
    """The 40 official annotation rows, with stand-in pictures large enough for their boxes."""
    fx = fixture_dir("cub", "CUB_200_2011")
    root = tmp_path / "CUB_200_2011"
    shutil.copytree(fx, root)
    boxes = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in (fx / "bounding_boxes.txt").read_text().splitlines()}
    for line in (fx / "images.txt").read_text().splitlines():
        i, name = line.split()
        x, y, w, h = boxes[i]
        stand_in_image(root / "images" / name, (int(x + w) + 3, int(y + h) + 3), seed=int(i))
    return root


def test_cub_pairs_as_distilldift_makes_them_by_hand(cub_root):
    rows = lambda f: [line.split() for line in (cub_root / f).read_text().splitlines()]  # noqa: E731
    test_ids = [i for i, flag in rows("train_test_split.txt") if flag == "0"]
    assert len(test_ids) == 21  # all 40 rows are class 001
    # DistillDIFT: itertools.combinations in images.txt order, then torch.manual_seed(42); torch.randperm; first 1,000
    combos = list(itertools.combinations([i for i, _ in rows("images.txt") if i in test_ids], 2))
    torch.manual_seed(42)
    order = torch.randperm(len(combos)).tolist()
    recs = open_dataset("cub", cub_root).pairs("test")
    assert [r.id for r in recs] == [f"{combos[k][0]}-{combos[k][1]}" for k in order]
    assert len(open_dataset("cub", cub_root, all_pairs=True).pairs("test")) == 210 and len(open_dataset("cub", cub_root).pairs("train")) == 171
    r = recs[0]
    a, b = r.id.split("-")
    parts = {}
    for i, part, x, y, v in rows("parts/part_locs.txt"):
        parts.setdefault(i, []).append((float(x), float(y), v == "1"))
    both = [k for k in range(15) if parts[a][k][2] and parts[b][k][2]]
    assert r.src_kps.tolist() == [list(parts[a][k][:2]) for k in both] and r.trg_kps.tolist() == [list(parts[b][k][:2]) for k in both]
    x, y, w, h = (float(v) for v in next(row for row in rows("bounding_boxes.txt") if row[0] == b)[1:])
    assert r.pck_base["standard"] == max(w, h) and r.trg_bbox == (x, y, x + w, y + h)
    assert r.category == "Black_footed_Albatross"
    assert open_dataset("cub", cub_root).keypoint_names == dict(row for row in (line.split(" ", 1) for line in (cub_root / "parts/parts.txt").read_text().splitlines()))
    preds = {q.id: q.trg_kps.copy() for q in recs}
    preds[r.id] = moved(r, 2)
    n = sum(q.n_points for q in recs)
    assert score(recs, preds, alphas=(0.1,))["per_point"]["all"]["0.1"] == pytest.approx((n - 2) / n)  # DistillDIFT's aggregation


def test_cub_wrong_layout_and_options_are_one_line(cub_root, capsys, tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": r.id, "kps": r.trg_kps.tolist()}) + "\n" for r in open_dataset("cub", cub_root).pairs("test")))
    assert main(["score", "--dataset", "cub", "--root", str(cub_root), "--split", "test", "--predictions", str(preds), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_point"]["all"]["0.1"] == 1.0
    (cub_root / "parts" / "part_locs.txt").unlink()
    one_line_error(capsys, ["pairs", "--dataset", "cub", "--root", cub_root, "--split", "test"], "part_locs.txt", "missing")
    one_line_error(capsys, ["score", "--dataset", "cub", "--root", cub_root, "--split", "test", "--predictions", preds], "part_locs.txt", "missing")
    one_line_error(capsys, ["pairs", "--dataset", "cub", "--root", cub_root.parent, "--split", "test"], "did you mean its CUB_200_2011/")
    one_line_error(capsys, ["pairs", "--dataset", "pfwillow", "--root", fixture_dir("pf-willow"), "--split", "test", "--all-pairs"],
                   "--all-pairs is for --dataset cub")


# ------------------------------------------------------------------------------ MP-100
@pytest.fixture
def mp100_root(tmp_path):
    """MARCO's real pair lists cut to the pairs whose records the fixture holds (the first 5 of
    each), the real annotation files, and no pictures."""
    fx = fixture_dir("mp100")
    root = tmp_path / "mp100_all"
    shutil.copytree(fx / "annotations", root / "annotations")
    (root / "pairs").mkdir()
    for f in (fx / "pairs").glob("*.json"):
        (root / "pairs" / f.name).write_text(json.dumps(json.loads(f.read_text())[:5]))
    return root


def test_mp100_every_sample_pair_resolves_and_keeps_indices_visible_in_both(mp100_root):
    coco = {}
    for f in sorted((mp100_root / "annotations").glob("*.json")):
        d = json.loads(f.read_text())
        for im in d["images"]:
            first = next(a for a in d["annotations"] if a["image_id"] == im["id"] and a["num_keypoints"] > 0)
            coco[im["file_name"]] = (im, first)
    ds = open_dataset("mp100", mp100_root)
    misaligned = 0
    for split in ds.splits:
        listed = json.loads((mp100_root / "pairs" / f"pairs_{split}.json").read_text())
        recs = ds.pairs(split)
        assert len(recs) == 5
        for r, p in zip(recs, listed):
            (_, a_s), (im_t, a_t) = coco[p["src_file"]], coco[p["trg_file"]]
            ks, kt = (np.asarray(a["keypoints"], dtype=float).reshape(-1, 3) for a in (a_s, a_t))
            both = (ks[:, 2] > 0) & (kt[:, 2] > 0)
            np.testing.assert_array_equal(r.src_kps, ks[both, :2])
            np.testing.assert_array_equal(r.trg_kps, kt[both, :2])
            misaligned += (ks[:, 2] > 0).sum() != both.sum() or (kt[:, 2] > 0).sum() != both.sum()
            x, y, w, h = a_t["bbox"]
            assert r.pck_base["standard"] == max(w, h) and r.trg_size == (im_t["width"], im_t["height"])
            assert r.src == f"mp100/{p['src_file']}" and r.meta["groups"] == {"domain": split}
    assert misaligned > 0  # pairs where filtering each side alone (MARCO's loader) would shift the rows


def test_mp100_score_by_domain_and_a_missing_record_named(mp100_root, capsys, tmp_path):
    ds = open_dataset("mp100", mp100_root)
    recs = ds.pairs("animal_face")
    preds = {r.id: r.trg_kps.copy() for r in recs}
    preds[recs[1].id] = moved(recs[1], 3)
    got = score(recs, preds, alphas=(0.1,))
    assert got["per_image"]["by_domain"]["animal_face"]["0.1"] == pytest.approx((4 + (recs[1].n_points - 3) / recs[1].n_points) / 5)
    full = json.loads((fixture_dir("mp100") / "pairs" / "pairs_animal_face.json").read_text())
    (mp100_root / "pairs" / "pairs_animal_face.json").write_text(json.dumps(full[:6]))  # the 6th pair's pictures are not in the sample
    one_line_error(capsys, ["pairs", "--dataset", "mp100", "--root", mp100_root, "--split", "animal_face"], "pairs_animal_face.json[5]",
                   full[5]["src_file"], "in no annotations")
    shutil.rmtree(mp100_root / "annotations")
    one_line_error(capsys, ["pairs", "--dataset", "mp100", "--root", mp100_root, "--split", "furniture"], "not an MP-100 root", "annotations/")


def test_mp100_checked_and_evaluated_on_stand_in_pictures_of_the_annotated_sizes(mp100_root, capsys, tmp_path):
    from PIL import Image

    from sd4match.testing import tiny_sd

    ds = open_dataset("mp100", mp100_root)
    sizes = {}
    for split in ds.splits:
        for r in ds.pairs(split):
            sizes[r.src], sizes[r.trg] = r.src_size, r.trg_size
    for k, (rel, size) in enumerate(sorted(sizes.items())):  # plain stand-ins: only their sizes matter here
        (mp100_root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * k % 255, 90, 160)).save(mp100_root / rel)
    assert main(["datasets", "check", "--dataset", "mp100", "--root", str(mp100_root)]) == 0
    out = capsys.readouterr().out
    assert "furniture 5 pairs (bed 2, sofa 1, table 2)" in out and "by domain: furniture 5" in out and "complete" in out
    model = tiny_sd(tmp_path / "sd")
    ev = tmp_path / "eval"
    assert main(["evaluate", "--dataset", "mp100", "--root", str(mp100_root), "--split", "furniture", "--model", str(model), "--resolution", "64",
                 "--ensemble", "1", "--device", "cpu", "--no-progress", "--out", str(ev), "--protocol", "standard"]) == 0
    doc = json.loads((ev / "score.json").read_text())
    assert doc["n_pairs"] == 5 and set(doc["per_image"]["by_domain"]) == {"furniture"}
    assert doc["per_point"]["by_domain"]["furniture"] == doc["per_point"]["all"]
    preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r.id for r in ds.pairs("furniture")]
    capsys.readouterr()
    assert main(["score", "--dataset", "mp100", "--root", str(mp100_root), "--split", "furniture", "--predictions", str(ev / "predictions.jsonl"),
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["per_image"] == doc["per_image"]  # evaluate's score equals sd4match score on its predictions


# ------------------------------------------------------------------------------ SPair-U
def _as_spair_u(spair_root: Path, dest: Path, folder: str = "PairAnnotation") -> list[str]:
    """SPair-71k's test annotation files laid out as SPair-U's (the same format), half of them."""
    ids = sorted(p.stem for p in (spair_root / "PairAnnotation" / "test").glob("*.json"))[::2]
    (dest / folder / "test").mkdir(parents=True)
    for pid in ids:
        shutil.copy(spair_root / "PairAnnotation" / "test" / f"{pid}.json", dest / folder / "test" / f"{pid}.json")
    return ids


def test_spair_u_in_its_own_folder_with_the_pictures_of_spair71k(spair_with_images, tmp_path, capsys):
    u = tmp_path / "SPair-U"
    ids = _as_spair_u(spair_with_images, u)
    with pytest.raises(DataError, match="--images"):
        open_dataset("spair-u", u)
    recs = open_dataset("spair-u", u, images=spair_with_images).pairs("test")
    assert [r.id for r in recs] == ids  # no layout file: annotation files in name order
    spair = {r.id: r for r in open_dataset("spair", spair_with_images).pairs("test")}
    for r in recs:  # SPair-71k's reader and protocol, the pictures found through --images
        assert r.src == "../SPair-71k/" + spair[r.id].src and (u / r.src).is_file()
        assert r.pck_base == spair[r.id].pck_base and np.array_equal(r.src_kps, spair[r.id].src_kps)
    # with SPair-71k's Layout/ linked in (MARCO): its test order, restricted to the pairs SPair-U annotates
    shutil.copytree(spair_with_images / "Layout", u / "Layout")
    listed = (u / "Layout/large/test.txt").read_text().split()
    assert [r.id for r in open_dataset("spair-u", u, images=spair_with_images).pairs("test")] == [i for i in listed if i in set(ids)]
    victim = spair_with_images / recs[0].src.replace("../SPair-71k/", "")
    victim.unlink()
    args = ["datasets", "check", "--dataset", "spair-u", "--root", u, "--images", spair_with_images, "--quick"]
    one_line_error(capsys, args, victim.name, "image file is missing")


def test_spair_u_laid_into_the_spair71k_tree(spair_with_images):
    ids = _as_spair_u(spair_with_images, spair_with_images, "ExtraPairAnnotation")  # Jamais Vu's layout
    recs = open_dataset("spair-u", spair_with_images).pairs("test")
    assert not any("geo_aware" in r.meta for r in recs)  # SPair-U's keypoints are new: SPair-71k's twins do not apply
    assert sorted(r.id for r in recs) == ids and all(r.src.startswith("JPEGImages/") for r in recs)
    preds = {r.id: r.trg_kps.copy() for r in recs}
    preds[recs[0].id] = moved(recs[0], 1)
    n = sum(r.n_points for r in recs)
    assert score(recs, preds, alphas=(0.1,))["per_point"]["all"]["0.1"] == pytest.approx((n - 1) / n)


def test_every_dataset_reader_is_a_cli_choice():
    import typing

    from sd4match.config import DatasetName
    from sd4match.data import DATASETS

    assert set(typing.get_args(DatasetName)) == set(DATASETS)
