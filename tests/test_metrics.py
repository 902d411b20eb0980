"""PCK scoring against hand-computed values, both protocols and both aggregations."""


import numpy as np
import pytest

from sd4match.data.records import PairRecord, pck_bases
from sd4match.errors import DataError, PredictionError
from sd4match.metrics import alpha_key, format_table, load_predictions, score


def rec(pid, cat, trg_size, trg_kps, rule="image", bbox=None, **meta):
    trg_kps = np.asarray(trg_kps, dtype=float)
    return PairRecord(
        id=pid, category=cat, src="a.jpg", trg="b.jpg", src_size=trg_size, trg_size=trg_size,
        src_kps=trg_kps.copy(), trg_kps=trg_kps, src_bbox=bbox, trg_bbox=bbox,
        pck_base=pck_bases(rule, trg_size, trg_kps, bbox), meta=meta,
    )


def test_alpha_keys():
    assert [alpha_key(a) for a in (0.05, 0.1, 0.15, 1.0)] == ["0.05", "0.1", "0.15", "1"]


def test_per_image_vs_per_point_by_hand():
    # square 100 x 100 images, image rule: standard b = 100, threshold at alpha 0.1 = 10 px
    a = rec("a", "cat", (100, 100), [[50, 50]])
    b = rec("b", "dog", (100, 100), [[10, 10], [20, 20], [30, 30]])
    preds = {
        "a": np.array([[55.0, 50.0]]),  # 5 px: correct at 0.1 and 0.15, wrong at 0.05 (5 <= 5 -> correct!)
        "b": np.array([[10.0, 22.0], [20.0, 35.0], [30.0, 30.0]]),  # 12 px, 15 px, 0 px
    }
    res = score([a, b], preds, protocol="standard", alphas=[0.05, 0.1, 0.15])
    # alpha 0.05 -> 5 px: a correct (5 <= 5); b: only the 0 px point
    # alpha 0.1 -> 10 px: a correct; b: 1 of 3
    # alpha 0.15 -> 15 px: a correct; b: all 3 (12, 15, 0)
    assert res["per_image"]["all"] == pytest.approx({"0.05": (1 + 1 / 3) / 2, "0.1": (1 + 1 / 3) / 2, "0.15": 1.0})
    assert res["per_point"]["all"] == pytest.approx({"0.05": 2 / 4, "0.1": 2 / 4, "0.15": 1.0})
    assert res["per_image"]["by_category"]["dog"] == pytest.approx({"0.05": 1 / 3, "0.1": 1 / 3, "0.15": 1.0})
    assert res["n_pairs"] == 2 and res["n_points"] == 4 and res["protocol"] == "standard"


def test_protocols_disagree_on_non_square_image():
    # target 200 (W) x 100 (H); image rule: standard b = 200 -> 20 px at alpha 0.1;
    # sd4match: frame scale (3.84, 7.68), b = 768 -> 76.8 at alpha 0.1.
    r = rec("p", "x", (200, 100), [[100, 50], [100, 50], [0, 0]])
    pred = np.array(
        [
            [100.0, 65.0],  # 15 px down: standard correct (15 <= 20); sd4match 115.2 > 76.8 wrong
            [119.0, 50.0],  # 19 px right: standard correct; sd4match 72.96 <= 76.8 correct
            [0.0, 9.0],  # gt (0,0) is clamped to (1e-4, 1e-4) in the frame; pred (0, 69.12): dist 69.12 -> correct in both
        ]
    )
    std = score([r], {"p": pred}, protocol="standard", alphas=[0.1])
    sd = score([r], {"p": pred}, protocol="sd4match", alphas=[0.1])
    assert std["per_point"]["all"]["0.1"] == pytest.approx(3 / 3)
    assert sd["per_point"]["all"]["0.1"] == pytest.approx(2 / 3)


def test_sd4match_clamp_and_bbox_base():
    # SPair-like bbox rule on a 400 x 200 target, box 100 x 100 -> standard b = 100,
    # sd4match b = max(100 * 768/400, 100 * 768/200) = 384. alpha 0.05 -> 5 px vs 19.2.
    box = (0.0, 0.0, 100.0, 100.0)
    r = rec("s", "x", (400, 200), [[400, 200]], rule="bbox", bbox=box)
    assert r.pck_base == {"standard": 100.0, "sd4match": 384.0}
    pred = np.array([[400.0, 200.0]])
    # standard: exact hit. sd4match: gt (768, 768) clamped to 767 - 1e-4; pred maps to (768, 768):
    # distance sqrt(2) * (1 + 1e-4) = 1.4144 <= 19.2 -> correct; at alpha 0.001 (0.384) wrong.
    res = score([r], {"s": pred}, protocol="sd4match", alphas=[0.05, 0.001])
    assert res["per_point"]["all"] == {"0.05": 1.0, "0.001": 0.0}
    assert score([r], {"s": pred}, protocol="standard", alphas=[0.001])["per_point"]["all"]["0.001"] == 1.0


def test_difficulty_groups():
    a = rec("a", "c", (100, 100), [[50, 50]], occlusion=0, truncation=1, viewpoint_variation=0, scale_variation=2)
    b = rec("b", "c", (100, 100), [[50, 50]], occlusion=1, truncation=1, viewpoint_variation=0, scale_variation=2)
    res = score([a, b], {"a": np.array([[50.0, 50]]), "b": np.array([[90.0, 90]])}, alphas=[0.1])
    assert res["per_image"]["by_difficulty"]["occlusion"] == {"0": {"0.1": 1.0}, "1": {"0.1": 0.0}}
    assert res["per_point"]["by_difficulty"]["truncation"] == {"1": {"0.1": 0.5}}


def test_missing_unknown_and_wrong_count():
    a = rec("a", "c", (100, 100), [[50, 50], [10, 10]])
    with pytest.raises(PredictionError, match="no prediction for pair 'a'"):
        score([a], {}, alphas=[0.1])
    assert score([a], {}, alphas=[0.1], allow_missing=True)["per_image"]["all"]["0.1"] == 0.0
    with pytest.raises(PredictionError, match="pair 'zz' is not in the pair list"):
        score([a], {"a": np.zeros((2, 2)), "zz": np.zeros((2, 2))}, alphas=[0.1])
    with pytest.raises(PredictionError, match="pair 'a': 1 predicted points for 2 source keypoints"):
        score([a], {"a": np.zeros((1, 2))}, alphas=[0.1])


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"id": "0", "kps": [[1, 2], [NaN, 3]]}\n', r"pred\.jsonl:1: pair '0': point 1 is \[nan, 3\], not a finite coordinate"),
        ('{"id": "0", "kps": [[1, 2]]}\n{"id": "0", "kps": [[1, 2]]}\n', r"pred\.jsonl:2: pair '0' is predicted twice"),
        ('{"id": "0", "kps": [[1, 2, 3]]}\n', r"shape \[1, 3\]"),
        ('{"id": "0", "kps": [[1, 2]]\n', r"pred\.jsonl:1: not valid JSON"),
        ('[{"id": "0", "kps": [[1, 2]]}]\n', r"pred\.jsonl:1: a JSON array, not JSON Lines: write one object a line"),
        ('[\n {"id": "0", "kps": [[1, 2]]}\n]\n', r"pred\.jsonl:1: a JSON array, not JSON Lines"),
        ('{"id": "0", "kps": [[1, 2]]}\n'.encode("utf-16"), r"pred\.jsonl: UTF-16 text \(as Windows PowerShell's > writes it\), not UTF-8"),
        (b'{"id": "caf\xe9", "kps": [[1, 2]]}\n', r"pred\.jsonl: not UTF-8 text \(at byte offset 11: 0xe9\)"),
    ],
)
def test_prediction_file_errors(tmp_path, text, message):
    p = tmp_path / "pred.jsonl"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PredictionError, match=message):
        load_predictions(p)


def test_predictions_saved_by_windows_tools_read_as_written(tmp_path):
    """A UTF-8 byte-order mark, CRLF line ends and blank lines change nothing."""
    lines = ['{"id": "0", "kps": [[1.5, 2]]}', '{"id": "b\u2028c", "kps": [[3, 4]]}']  # U+2028 inside a string is not a line end
    plain, windows = tmp_path / "plain.jsonl", tmp_path / "windows.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    windows.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(lines).encode() + b"\r\n")
    a, b = load_predictions(plain), load_predictions(windows)
    assert list(a) == list(b) == ["0", "b\u2028c"]
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["0"].tolist() == [[1.5, 2.0]]


def test_category_mean_counts_each_category_once():
    # cat: two pairs of one point, one right one wrong -> per image 0.5, per point 0.5;
    # dog: one pair of three points, one right -> 1/3 both ways; bird: a pair without keypoints
    # (not scored, so not a category of the mean). Means over the 2 scored categories:
    # (0.5 + 1/3) / 2, while "all" pools the pairs: per image (1 + 0 + 1/3) / 3, per point 2/5.
    a1 = rec("a1", "cat", (100, 100), [[50, 50]])
    a2 = rec("a2", "cat", (100, 100), [[50, 50]])
    b = rec("b", "dog", (100, 100), [[10, 10], [20, 20], [30, 30]])
    e = rec("e", "bird", (100, 100), np.zeros((0, 2)))
    preds = {"a1": np.array([[50.0, 50]]), "a2": np.array([[90.0, 90]]),
             "b": np.array([[10.0, 10], [60, 60], [90, 90]]), "e": np.zeros((0, 2))}
    res = score([a1, a2, b, e], preds, alphas=[0.1])
    assert res["n_categories"] == 2
    assert res["per_image"]["category_mean"] == pytest.approx({"0.1": (0.5 + 1 / 3) / 2})
    assert res["per_point"]["category_mean"] == pytest.approx({"0.1": (0.5 + 1 / 3) / 2})
    assert res["per_image"]["all"] == pytest.approx({"0.1": (1 + 0 + 1 / 3) / 3})
    assert res["per_point"]["all"] == pytest.approx({"0.1": 2 / 5})
    # a category whose per-image and per-point PCK differ: cat gets a third pair of 3 points, all right
    a3 = rec("a3", "cat", (100, 100), [[10, 10], [20, 20], [30, 30]])
    preds["a3"] = a3.trg_kps.copy()
    del preds["e"]
    res = score([a1, a2, a3, b], preds, alphas=[0.1])
    assert res["per_image"]["category_mean"]["0.1"] == pytest.approx(((1 + 0 + 1) / 3 + 1 / 3) / 2)
    assert res["per_point"]["category_mean"]["0.1"] == pytest.approx((4 / 5 + 1 / 3) / 2)
    table = format_table(res)
    assert "mean of the 2 categories" in table


def test_pf_willow_sub_classes_are_seen_by_the_pf_pascal_class_they_show():
    """The paper scores PF-Willow with prompts trained on PF-Pascal: car(G) is a car and
    duck(S) a bird to such a prompt (the official mapping a category prompt reads them by),
    so they are seen; a category of neither name is unseen (before: all five PF-Willow
    sub-classes were reported unseen). By hand: car(G) 1 of 1 right, duck(S) 0 of 1,
    winebottle(wC) 1 of 1 against a prompt that saw car and bird only."""
    from sd4match.config import category_names
    from sd4match.metrics import seen_unseen

    assert category_names("duck(S)") == ("duck(S)", "duck", "bird") and category_names("car(G)") == ("car(G)", "car")
    assert category_names("cat") == ("cat",)
    recs = [rec("g", "car(G)", (100, 100), [[50, 50]]), rec("d", "duck(S)", (100, 100), [[50, 50]]), rec("w", "winebottle(wC)", (100, 100), [[50, 50]])]
    preds = {"g": np.array([[50.0, 50]]), "d": np.array([[90.0, 90]]), "w": np.array([[50.0, 50]])}
    res = score(recs, preds, alphas=[0.1])
    su = seen_unseen(res, ["car", "bird", "aeroplane"])
    assert su["seen"] == ["car(G)", "duck(S)"] and su["unseen"] == ["winebottle(wC)"]
    assert su["per_image"]["seen"] == pytest.approx({"0.1": 0.5}) and su["per_image"]["unseen"] == pytest.approx({"0.1": 1.0})
    assert seen_unseen(res, ["car(G)"])["seen"] == ["car(G)"]  # its own name still counts


def test_score_takes_predictions_in_the_forms_python_holds_them():
    """From Python, predictions may be lists of [x, y], tensors, arrays keyed by string or
    number ids, or one per record in order: all score alike (before: AttributeError 'list'
    object has no attribute 'shape', unhashable ndarray, or unknown ids for 0 vs "0");
    a NaN point is named as in a predictions file (before: silently a miss)."""
    import torch

    recs = [rec("0", "cat", (100, 100), [[50, 50], [10, 10]]), rec("1", "dog", (100, 100), [[20, 20]])]
    good = {"0": np.array([[50.0, 50], [90, 90]]), "1": np.array([[20.0, 25]])}
    want = score(recs, good, alphas=[0.1])
    assert want["per_point"]["all"] == pytest.approx({"0.1": 2 / 3})  # by hand: 2 of the 3 points within 10 px
    for form in ({k: v.tolist() for k, v in good.items()}, {int(k): v for k, v in good.items()}, {k: torch.tensor(v) for k, v in good.items()},
                 [good["0"], good["1"]]):
        assert score(recs, form, alphas=[0.1]) == want
    for bad, msg in (({"0": [[float("nan"), 1.0], [1, 1]], "1": good["1"]}, r"pair '0': point 0 is \[nan, 1.0\], not a finite coordinate"),
                     ([good["0"]], r"1 predictions for 2 pairs \(a list is read in the pairs' order: one each\)"),
                     ({0: good["0"], "0": good["0"], "1": good["1"]}, r"pair '0' is predicted twice"),
                     ({"0": [[1, 2, 3]], "1": good["1"]}, r"pair '0': kps has shape \[1, 3\], expected \[N, 2\]")):
        with pytest.raises(PredictionError, match=msg):
            score(recs, bad, alphas=[0.1])


def test_each_pair_with_its_points_errors_by_hand():
    """``pair_details``: each pair's PCK and each point's error / b in the protocol's frame
    (correct at α when ≤ α), in the records' order; pairs without a prediction left out."""
    from sd4match.metrics import pair_details

    a = rec("a", "cat", (100, 100), [[50, 50], [10, 10]])  # image rule: b = 100
    b = rec("b", "dog", (200, 100), [[20, 20]], geo_aware=[True])  # b = 200
    c = rec("c", "dog", (100, 100), [[5, 5]])
    preds = {"a": np.array([[53.0, 54.0], [10.0, 30.0]]), "b": np.array([[20.0, 40.0]])}
    rows = pair_details([a, b, c], preds, protocol="standard", alphas=(0.05, 0.1))
    assert rows == [
        {"id": "a", "category": "cat", "n_points": 2, "pck": {"0.05": 0.5, "0.1": 0.5}, "error": [0.05, 0.2]},  # 5 px and 20 px of 100
        {"id": "b", "category": "dog", "n_points": 1, "pck": {"0.05": 0.0, "0.1": 1.0}, "error": [0.1], "geo_aware": [True]},  # 20 px of 200
    ]
    with pytest.raises(PredictionError, match="pair 'a': 1 predicted points for 2 source keypoints"):
        pair_details([a], {"a": np.array([[1.0, 2.0]])})


def test_score_writes_each_pair_and_draws_the_worst(willow_root, tmp_path, capsys):
    """``score --per-pair`` writes what ``pair_details`` gives; ``--worst`` draws the pairs of
    lowest PCK@0.1, more points first where equal, and names a missing picture in one line."""
    import json
    import shutil

    from sd4match.cli import main
    from sd4match.data import open_dataset
    from sd4match.metrics import draw_worst, pair_details

    recs = open_dataset("pfwillow", willow_root).pairs("test")[:6]
    preds = {r.id: r.trg_kps.copy() for r in recs}
    for r, wrong in zip(recs, (3, 0, 7, 3, 1, 0)):  # pairs 0 and 3 tie at 3 wrong of 10
        preds[r.id][:wrong, 0] += 0.3 * r.pck_base["standard"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": k, "kps": v.tolist()}) + "\n" for k, v in preds.items()))
    argv = ["score", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--predictions", str(tmp_path / "p.jsonl"),
            "--allow-missing", "--per-pair", str(tmp_path / "pairs.jsonl"), "--worst", str(tmp_path / "worst.png"), "--worst-count", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().err.strip() == f"the 3 pairs of lowest PCK@0.1 drawn in {tmp_path / 'worst.png'}"
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(pair_details(recs, preds))) and [r["pck"]["0.1"] for r in rows] == [0.7, 1.0, 0.3, 0.7, 0.9, 1.0]
    assert draw_worst(recs, preds, willow_root, tmp_path / "again.png", count=3) == [recs[2].id, recs[0].id, recs[3].id]
    assert main([*argv, "--alphas", "0.05,0.15"]) == 0  # no 0.1 asked for: the middle of those
    assert capsys.readouterr().err.strip() == f"the 3 pairs of lowest PCK@0.15 drawn in {tmp_path / 'worst.png'}"
    from PIL import Image

    assert Image.open(tmp_path / "worst.png").width > 640
    root = tmp_path / "willow"
    shutil.copytree(willow_root, root)
    (root / recs[2].trg).unlink()
    assert main([*argv[:4], str(root), *argv[5:]]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{root / recs[2].trg}: image file is missing")


def test_score_with_another_threshold_base(willow_root, spair_root, tmp_path, capsys):
    """``--pck-base``: a table that thresholds on the image where the dataset uses the
    keypoints (or the box) is matched; the header names b; a base the pairs lack is one line."""
    import json

    from sd4match.cli import main
    from sd4match.data import open_dataset

    recs = open_dataset("pfwillow", willow_root).pairs("test")
    preds = {}
    right = []
    for r in recs:  # every point 0.09 x max(W, H) off: within 0.1 of the image's side; of the keypoints' extent only where it is large
        preds[r.id] = r.trg_kps + [[0.09 * max(r.trg_size), 0]]
        right.append(0.09 * max(r.trg_size) <= 0.1 * np.ptp(r.trg_kps, axis=0).max())
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": k, "kps": v.tolist()}) + "\n" for k, v in preds.items()))
    argv = ["score", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--predictions", str(tmp_path / "p.jsonl"),
            "--alphas", "0.1"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_point"]["all"]["0.1"] == pytest.approx(np.mean(right)) and 0 < np.mean(right) < 0.5
    assert main([*argv, "--json", "--pck-base", "image"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["pck_base"] == "image" and got["per_point"]["all"]["0.1"] == 1.0
    assert main([*argv, "--pck-base", "image"]) == 0
    assert capsys.readouterr().out.startswith("PCK on pfwillow/test | protocol: standard | b: max side of the target image (--pck-base image)")
    assert main([*argv, "--pck-base", "bbox"]) == 2
    assert capsys.readouterr().err.strip() == "sd4match: error: pair 0: has no target box, so PCK cannot be based on one on pfwillow (use image or kps)"
    # SPair-71k on the image's side: b = max(W, H) of the target picture (500 for the first pair, 500 x 332)
    from sd4match.data.records import rebased

    first = rebased(open_dataset("spair", spair_root).pairs("test")[:1], "image")[0]
    assert first.pck_base == {"standard": 500.0, "sd4match": 768.0}
    one = rec("one", "cat", (100, 100), [[5, 5]])  # a single keypoint: its extent is 0
    with pytest.raises(DataError, match=r"^pair one: its target keypoints span nothing \(1 at one place\), so no threshold"):
        rebased([one], "kps")


def test_score_takes_one_threshold_or_several_and_refuses_what_is_no_threshold(willow_root):
    from sd4match.data import open_dataset
    from sd4match.metrics import pair_details, score

    recs = open_dataset("pfwillow", willow_root).pairs("test")[:3]
    preds = {r.id: r.trg_kps + [0.07 * r.pck_base["standard"], 0] for r in recs}  # every point 0.07 b off
    assert score(recs, preds, alphas=0.1)["per_point"]["all"] == {"0.1": 1.0}
    assert score(recs, preds, alphas=(0.05, 0.1, 0.1))["per_point"]["all"] == {"0.05": 0.0, "0.1": 1.0}
    assert pair_details(recs, preds, alphas=0.05)[0]["pck"] == {"0.05": 0.0}
    for bad in (0, [0.1, 0], 1.5, [], "x", [None]):
        with pytest.raises(ValueError, match="alphas must"):
            score(recs, preds, alphas=bad)
