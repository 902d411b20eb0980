"""The command line: pair export, scoring, dataset checks, one-line errors."""

import contextlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd4match.cli import main


def run(*args):
    """Run ``python -m sd4match`` in a fresh process: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "sd4match", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def here(*args):
    """``sd4match ARGS`` in this process (a second or two faster than a fresh one, for the
    commands whose messages do not depend on a fresh interpreter): exit code, stdout, stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, err, *fragments):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sd4match: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_pairs_export_format(tmp_path, spair_root):
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--dataset", "spair", "--root", str(spair_root), "--split", "test", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 27
    first = rows[0]
    assert list(first) == ["id", "category", "src", "trg", "src_size", "trg_size", "src_kps", "trg_kps", "src_bbox", "trg_bbox", "pck_base", "meta"]
    raw = json.loads((spair_root / "PairAnnotation/test" / f"{first['id']}.json").read_text())
    assert first["trg_kps"] == raw["trg_kps"] and first["trg_bbox"] == raw["trg_bndbox"]
    assert first["src_size"] == raw["src_imsize"][:2]
    assert first["pck_base"]["standard"] == 464


def test_datasets_are_taken_as_their_papers_spell_them(tmp_path, willow_root):
    from sd4match.cli import build_parser
    from sd4match.config import EvalConfig, TrainConfig
    from sd4match.data import PFWillow, open_dataset
    from sd4match.errors import Sd4MatchError

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert here("pairs", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--out", a)[0] == 0
    assert here("pairs", "--dataset", "PF-Willow", "--root", willow_root, "--split", "test", "--out", b)[0] == 0
    assert b.read_bytes() == a.read_bytes() and len(a.read_text().splitlines()) == 450
    parser = build_parser()
    for text, name in [("SPair-71k", "spair"), ("pf_pascal", "pfpascal"), ("AP-10K", "ap10k"), ("CUB-200-2011", "cub"), ("MP-100", "mp100"),
                       ("SPair-U", "spair-u"), ("spair", "spair")]:
        assert parser.parse_args(["evaluate", "--dataset", text, "--root", "r", "--split", "test", "--out", "o"]).dataset == name
        assert parser.parse_args(["train", "--dataset", text, "--root", "r", "--out", "o"]).dataset == name
        assert EvalConfig(dataset=text, root="r").dataset == name and TrainConfig(dataset=text, root="r").dataset == name
    assert isinstance(open_dataset("PF-Willow", willow_root), PFWillow)
    with pytest.raises(SystemExit):
        parser.parse_args(["pairs", "--dataset", "willow", "--root", "r", "--split", "test"])
    with pytest.raises(Sd4MatchError, match="dataset 'willow': expected one of spair, "):
        EvalConfig(dataset="willow", root="r")


def _willow_predictions(tmp_path, willow_root, noise_px, seed=0):
    from sd4match.data import open_dataset

    recs = open_dataset("pfwillow", willow_root).pairs("test")
    rng = np.random.default_rng(seed)
    path = tmp_path / "pred.jsonl"
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps({"id": r.id, "kps": (r.trg_kps + rng.normal(0, noise_px, r.trg_kps.shape)).tolist()}) + "\n")
    return recs, path


def test_predictions_in_another_frame_are_named_and_scored_as_given(tmp_path, willow_root):
    """Predictions in the official 768 frame, as (y, x), as fractions or as grid coordinates
    scored 0 (or near it) without a word; now a warning names the likely frame and its
    conversion, the scores staying those of the predictions as given. Right ones, and a
    poor method's (its points inside the pictures), get no warning."""
    from sd4match.metrics import frame_hint, load_predictions

    recs, path = _willow_predictions(tmp_path, willow_root, noise_px=3.0)
    preds = load_predictions(path)
    wh = {r.id: np.array(r.trg_size, dtype=np.float64) for r in recs}
    for convert, words in ((lambda p, s: p * 768 / s, "coordinates in the 768 x 768 frame (the official code's)"),
                           (lambda p, s: p[:, ::-1], "(y, x) pairs"),
                           (lambda p, s: p / s, "fractions of the picture (0 to 1)"),
                           (lambda p, s: 2 * p / s - 1, "grid coordinates (-1 to 1)")):
        moved = tmp_path / "moved.jsonl"
        moved.write_text("".join(json.dumps({"id": k, "kps": convert(v, wh[k]).tolist()}) + "\n" for k, v in preds.items()))
        rc, out, err = here("score", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--predictions", moved, "--json")
        assert rc == 0 and f"if they are {words}: sd4match reads (x, y) in the target picture's original pixels" in err, err
        assert json.loads(out)["per_point"]["all"]["0.1"] < 0.5  # scored as given, not converted
    rc, out, err = here("score", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--predictions", path)
    assert rc == 0 and "warning" not in err
    rng = np.random.default_rng(0)
    poor = {r.id: rng.uniform(0, 1, (r.n_points, 2)) * np.array(r.trg_size) for r in recs}  # chance level, inside the pictures
    assert frame_hint(recs, poor) is None
    far = {r.id: np.full((r.n_points, 2), -300.0) for r in recs}
    assert frame_hint(recs, far) == ("100% of the predicted points lie outside their target pictures: predictions are (x, y) in the target "
                                     "picture's original pixels")


def test_score_cli_matches_library_and_hand_count(tmp_path, willow_root):
    recs, path = _willow_predictions(tmp_path, willow_root, noise_px=8.0)
    rc, out, err = here("score", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--predictions", path, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["protocol"] == "standard" and res["n_pairs"] == 450 and res["n_points"] == 4500
    assert set(res["per_image"]["all"]) == {"0.05", "0.1", "0.15"}
    # independent count: distances against alpha * max extent of the target points
    preds = [json.loads(l)["kps"] for l in path.read_text().splitlines()]
    hits = [np.linalg.norm(np.array(p) - r.trg_kps, axis=1) <= 0.1 * max(r.trg_kps.max(0) - r.trg_kps.min(0)) for p, r in zip(preds, recs)]
    assert res["per_point"]["all"]["0.1"] == pytest.approx(np.concatenate(hits).mean())
    assert res["per_image"]["all"]["0.1"] == pytest.approx(np.mean([h.mean() for h in hits]))
    assert set(res["per_image"]["by_category"]) == {"car(G)", "car(S)", "duck(S)", "motorbike(M)", "winebottle(wC)"}
    assert res["n_pairs_by_category"] == {c: sum(r.category == c for r in recs) for c in res["per_image"]["by_category"]} == dict.fromkeys(res["per_image"]["by_category"], 90)


def test_score_table_and_plot(tmp_path, willow_root):
    _, path = _willow_predictions(tmp_path, willow_root, noise_px=8.0)
    png = tmp_path / "bars.png"
    rc, out, err = here("score", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--predictions", path, "--protocol", "sd4match", "--plot", png)
    assert rc == 0, err
    assert "protocol: sd4match" in out.splitlines()[0]
    assert "[per image (mean of pair PCK)]" in out and "[per point (all points pooled)]" in out
    im = Image.open(png)
    assert im.width > 300 and im.height > 200
    assert np.asarray(im.convert("L")).std() > 5  # not blank


def test_score_rescores_a_limited_evaluation_on_its_pairs(tmp_path, willow_root):
    """The predictions of `evaluate --limit 12`: `score --limit 12` scores those 12 pairs (the
    same pairs: 2 or 3 of each sub-class, not the first 12 of car(G)); without it, the error
    says so rather than suggesting --allow-missing alone."""
    from sd4match.data.records import limit_pairs

    recs, full = _willow_predictions(tmp_path, willow_root, noise_px=6.0)
    kept = {r.id for r in limit_pairs(recs, 12)}
    part = tmp_path / "limited.jsonl"
    part.write_text("".join(l + "\n" for l in full.read_text().splitlines() if json.loads(l)["id"] in kept))
    base = ["score", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--json", "--predictions"]
    rc, out, err = here(*base, part, "--limit", "12")
    assert rc == 0, err
    res = json.loads(out)
    assert res["n_pairs"] == 12 and len(res["per_image"]["by_category"]) == 5
    by_hand = [r for r in recs if r.id in kept]
    preds = {json.loads(l)["id"]: np.array(json.loads(l)["kps"]) for l in part.read_text().splitlines()}
    hits = [np.linalg.norm(preds[r.id] - r.trg_kps, axis=1) <= 0.1 * max(r.trg_kps.max(0) - r.trg_kps.min(0)) for r in by_hand]
    assert res["per_image"]["all"]["0.1"] == pytest.approx(np.mean([h.mean() for h in hits]))
    assert_one_line_error(*here(*base, part)[::2], "limited.jsonl: holds 12 of the split's 450 pairs, those `evaluate --limit 12` takes: pass --limit 12")
    assert_one_line_error(*here(*base, full, "--limit", "12")[::2], "is not in the pair list")  # the full predictions hold pairs beyond the 12


def test_score_errors(tmp_path, willow_root):
    recs, path = _willow_predictions(tmp_path, willow_root, noise_px=1.0)
    lines = path.read_text().splitlines()
    base = ["score", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--predictions"]
    bad = tmp_path / "bad.jsonl"
    d = json.loads(lines[5]); d["kps"] = d["kps"][:9]
    bad.write_text("\n".join(lines[:5] + [json.dumps(d)] + lines[6:]) + "\n")
    assert_one_line_error(*here(*base, bad)[::2], "pair '5': 9 predicted points for 10 source keypoints")
    bad.write_text("\n".join(lines + [json.dumps({"id": "9999", "kps": d["kps"]})]) + "\n")
    assert_one_line_error(*here(*base, bad)[::2], "pair '9999' is not in the pair list")
    bad.write_text("\n".join(lines[1:]) + "\n")
    assert_one_line_error(*here(*base, bad)[::2], "no prediction for pair '0'", "--allow-missing")
    d = json.loads(lines[0]); d["kps"][3][1] = float("nan")
    bad.write_text("\n".join([json.dumps(d)] + lines[1:]) + "\n")
    assert_one_line_error(*here(*base, bad)[::2], "bad.jsonl:1", "pair '0': point 3", "not a finite coordinate")
    rc, _, err = run("--debug", *base, bad)
    assert rc != 0 and "Traceback" in err


def test_outputs_never_replace_what_the_command_reads(tmp_path, willow_root):
    """``score``'s and ``pairs``' output files may not be the predictions or a pair list they
    read (under any name: a symlink, a path with ``..``) nor each other: one line, every file
    byte for byte as it was; a picture's suffix picks its format."""
    root = tmp_path / "w"
    shutil.copytree(willow_root, root)
    recs, path = _willow_predictions(tmp_path, root, noise_px=1.0)
    before, pairs_csv = path.read_bytes(), (root / "test_pairs.csv").read_bytes()
    (tmp_path / "link.jsonl").symlink_to(path)
    base = ["score", "--dataset", "pfwillow", "--root", root, "--split", "test", "--predictions", path]
    for flag, name in (("--per-pair", path), ("--out", tmp_path / "sub" / ".." / path.name), ("--per-pair", tmp_path / "link.jsonl"),
                       ("--out", root / "test_pairs.csv")):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert_one_line_error(*here(*base, flag, name)[::2], f"{flag} {name}: is the file", "writing it would replace what it reads")
    assert_one_line_error(*here(*base, "--out", tmp_path / "a.json", "--per-pair", tmp_path / "a.json")[::2],
                          "--per-pair", "is the file --out writes")
    assert not (tmp_path / "a.json").exists()
    assert_one_line_error(*here("pairs", "--dataset", "pfwillow", "--root", root, "--split", "test", "--out", root / "test_pairs.csv")[::2],
                          "is the file --root (test) reads")
    assert path.read_bytes() == before and (root / "test_pairs.csv").read_bytes() == pairs_csv
    # pictures in the format their name asks for; a name no writer knows is refused before any scoring
    assert_one_line_error(*here(*base, "--worst", tmp_path / "w.txt")[::2], "--worst", "cannot write a .txt picture")
    assert_one_line_error(*here(*base, "--plot", tmp_path / "bars.docx")[::2], "--plot", "cannot write a .docx picture")
    rc, _, err = run(*base, "--worst", tmp_path / "w.jpg", "--worst-count", "2", "--plot", tmp_path / "bars.pdf")
    assert rc == 0, err
    assert (tmp_path / "w.jpg").read_bytes()[:3] == b"\xff\xd8\xff" and (tmp_path / "bars.pdf").read_bytes()[:5] == b"%PDF-"


def test_dataset_errors_are_one_line(tmp_path, willow_root, spair_root):
    root = tmp_path / "pf-willow"
    shutil.copytree(willow_root, root)
    (root / "PF-dataset/duck(S)/060_0002.png").unlink()
    assert_one_line_error(*here("pairs", "--dataset", "pfwillow", "--root", root, "--split", "test")[::2], "060_0002.png", "image file is missing")
    (root / "PF-dataset/duck(S)/060_0002.png").write_bytes(b"GIF89a garbage")
    assert_one_line_error(*here("pairs", "--dataset", "pfwillow", "--root", root, "--split", "test")[::2], "060_0002.png", "not a readable image")
    assert_one_line_error(*here("pairs", "--dataset", "spair", "--root", tmp_path, "--split", "test")[::2], str(tmp_path), "not a SPair-71k root")
    lines = (root / "test_pairs.csv").read_text().splitlines()
    (root / "test_pairs.csv").write_text("\n".join(lines[:7] + [lines[7] + ",3.5"] + lines[8:]) + "\n")
    assert_one_line_error(*here("pairs", "--dataset", "pfwillow", "--root", root, "--split", "test")[::2], "test_pairs.csv:8", "expected 42 columns, got 43")
    sp = tmp_path / "sp"
    shutil.copytree(spair_root, sp)
    f = next((sp / "PairAnnotation/test").glob("000001-*.json"))
    ann = json.loads(f.read_text()); del ann["src_bndbox"]; f.write_text(json.dumps(ann))
    assert_one_line_error(*here("pairs", "--dataset", "spair", "--root", sp, "--split", "test")[::2], f.name, "missing key 'src_bndbox'")


def test_pairs_out_failure_keeps_existing_file(tmp_path, willow_root):
    out = tmp_path / "pairs.jsonl"
    out.write_text("precious\n")
    root = tmp_path / "w"
    shutil.copytree(willow_root, root)
    (root / "PF-dataset/duck(S)/060_0002.png").unlink()
    rc, _, _ = run("pairs", "--dataset", "pfwillow", "--root", root, "--split", "test", "--out", out)
    assert rc != 0 and out.read_text() == "precious\n"


def test_datasets_check(tmp_path, willow_root, spair_root, spair_with_images):
    rc, out, err = here("datasets", "check", "--dataset", "pfwillow", "--root", willow_root)
    assert rc == 0, err
    assert "test  450 pairs" in out and "duck(S) 90" in out and "complete" in out
    rc, out, err = here("datasets", "check", "--dataset", "spair", "--root", spair_with_images)
    assert rc == 0, err
    assert "test  27 pairs" in out and "trn   2 pairs" in out
    # the fixtures hold the image annotations of 7 test pairs' targets (test_spair: GEO_BY_HAND)
    assert ("        geometry-aware subset: left out of scores (7 of the 27 pairs have it, the others lack the target's "
            "ImageAnnotation/<category>/<name>.json)\n") in out
    kept = tmp_path / "seven"
    shutil.copytree(spair_with_images, kept)
    listed = (kept / "Layout/large/test.txt").read_text().split()
    (kept / "Layout/large/test.txt").write_text("".join(p + "\n" for p in listed if p.startswith(("000001", "000715", "000718", "002120", "004420", "004423", "005637"))))
    rc, out, err = here("datasets", "check", "--dataset", "spair", "--root", kept)
    assert "test  7 pairs" in out and "        geometry-aware subset: 26 points in its 7 pairs\n" in out
    # the annotation-only fixture lacks JPEGImages/: non-zero exit naming it
    rc, out, err = here("datasets", "check", "--dataset", "spair", "--root", spair_root)
    assert_one_line_error(rc, err, "JPEGImages: missing")
    # one image unreadable: named
    victim = next((spair_with_images / "JPEGImages/bird").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:20])
    rc, out, err = here("datasets", "check", "--dataset", "spair", "--root", spair_with_images)
    assert_one_line_error(rc, err, victim.name)


def test_datasets_check_decodes_every_image_and_lists_every_bad_one(tmp_path, willow_root):
    """A truncated PNG has a good header: only decoding finds it. Every bad file is listed."""
    root = tmp_path / "willow"
    shutil.copytree(willow_root, root)
    pngs = sorted((root / "PF-dataset").rglob("*.png"))
    for victim in (pngs[3], pngs[17]):
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    rc, out, err = here("datasets", "check", "--dataset", "pfwillow", "--root", root, "--quick")
    assert rc == 0 and "headers read (--quick)" in out  # headers alone cannot tell
    rc, out, err = here("datasets", "check", "--dataset", "pfwillow", "--root", root)
    assert_one_line_error(rc, err, pngs[3].name, "and 1 more problem(s)")
    assert "2 problem(s):" in out and pngs[3].name in out and pngs[17].name in out


def test_cli_match_rules_are_the_library_rules():
    from sd4match import cli, matching

    assert sorted(cli.MATCH_RULES) == sorted(matching.MATCH_RULES) and cli.MATCH_RULES[0] == "kernel-softargmax"


def test_pairs_into_a_closed_pipe_ends_quietly(willow_root):
    """`sd4match pairs ... | head -1`: the reader leaves after one line; the export (far more
    than a pipe holds) stops with exit 0 and nothing on stderr."""
    p = subprocess.Popen([sys.executable, "-m", "sd4match", "pairs", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()  # as `head -1` does: every later write of sd4match meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert err == "" and json.loads(first)["id"] == "0"


def _flag_helps(command: str) -> dict[str, str]:
    """Each option of ``sd4match COMMAND --help`` -> its help text (joined lines)."""
    rc, out, err = run(*command.split(), "--help")
    assert rc == 0, err
    helps: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        stripped = line.strip()
        if line.startswith("  -") or line.startswith("  --"):
            current = stripped.split()[0].rstrip(",")
            helps[current] = stripped
        elif current and line.startswith("    ") and stripped:
            helps[current] += " " + stripped
        elif not stripped or not line.startswith(" "):
            current = None
    return helps


@pytest.mark.parametrize("command", ["train", "evaluate", "match", "transfer", "serve", "features"])
def test_help_gives_each_flag_once_and_its_default_once(command):
    helps = _flag_helps(command)
    assert len(helps) > 10
    for flag, text in helps.items():
        assert text.count("(default") <= 1, (flag, text)
        assert "(default: None)" not in text and "(default None)" not in text, (flag, text)
    if command == "train":  # the settings' defaults, shown once although every flag starts unset
        assert "(default: 9)" in helps["--batch-size"] and "(default: 0.01)" in helps["--lr"]
        assert "default" not in helps["--root"] and "default" not in helps["--out"]  # required
    if command == "evaluate":
        assert "(default: kernel-softargmax)" in helps["--match"] and "default" not in helps["--dataset"]


def test_prompts_import_shows_only_the_flags_it_uses():
    helps = _flag_helps("prompts import")
    assert {"--kind", "--out", "--dino", "--model", "--model-config", "--device"} <= set(helps)
    assert not {"--timestep", "--ensemble", "--resolution", "--compile", "--max-batch", "--up-block"} & set(helps)


@pytest.mark.parametrize("command,flag,value,words", [
    ("evaluate", "--limit", "-1", "limit -1: must be at least 0"),  # used to score all pairs but the last
    ("evaluate", "--max-pending", "1", "max-pending 1: must be at least 2"),  # used to end in a traceback
    ("evaluate", "--temperature", "0", "temperature 0.0: must be above 0"),  # used to divide by zero
    ("evaluate", "--sigma", "nan", "sigma nan: expected a finite number"),
    ("evaluate", "--max-batch", "0", "max-batch 0: must be at least 1"),
    ("evaluate", "--store-gb", "-1", "argument --store-gb: -1 must be at least 0"),
    ("train", "--micro-batch", "0", "micro-batch 0: must be at least 1"),  # used to be a ZeroDivisionError
    ("train", "--ckpt-every", "0", "ckpt-every 0: must be at least 1"),  # the same
    ("train", "--batch-size", "0", "batch-size 0: must be at least 1"),  # used to train on nothing
    ("train", "--lr", "-1", "lr -1.0: must be above 0"),  # used to ascend the loss
    ("train", "--steps", "-3", "steps -3: must be at least 1"),
    ("train", "--keep-checkpoints", "0", "keep-checkpoints 0: must be at least 1"),  # would keep nothing to resume from
    ("train", "--window", "4", "window 4: must be odd"),
    ("train", "--val-every", "-2", "val-every -2: must be at least -1"),
    ("match", "--max-points", "0", "argument --max-points: 0 must be at least 1"),
    ("reproduce", "--limit", "-5", "argument --limit: -5 must be at least 0"),
    ("features", "--pca", "500", "argument --pca: 500 must be at most 64"),  # every map held at once: 13 GB of SD maps
    ("score", "--worst-count", "1000", "argument --worst-count: 1000 must be at most 48"),  # one sheet ~100,000 px tall
])
def test_a_number_out_of_its_range_is_one_line_before_any_model_loads(tmp_path, willow_root, command, flag, value, words, capsys):
    """Every numeric setting has its range; a value outside it is refused in one line naming
    the setting, before any model loads (the model named here does not exist: reaching it
    would be another error)."""
    model = ["--model", str(tmp_path / "no-such-model")]
    argv = {
        "evaluate": ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--out", str(tmp_path / "e"), *model],
        "train": ["train", "--dataset", "synthetic", "--root", str(willow_root), "--out", str(tmp_path / "t"), *model],
        "match": ["match", str(willow_root / "PF-dataset" / "car(G)" / "Cars_006a.png"), str(willow_root / "PF-dataset" / "car(G)" / "Cars_007a.png"),
                  "--out", str(tmp_path / "m"), *model],
        "reproduce": ["reproduce", "--prompts", str(tmp_path), "--out", str(tmp_path / "r")],
        "features": ["features", "--images", str(willow_root / "PF-dataset"), "--out", str(tmp_path / "f"), *model],
        "score": ["score", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--predictions", str(tmp_path / "p.jsonl"),
                  "--worst", str(tmp_path / "s" / "w.png")],
    }[command]
    with pytest.raises(SystemExit) if words.startswith("argument") else contextlib.nullcontext():
        assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert words in err and err.startswith(("sd4match: error:", f"sd4match {command}: error:")), err
    assert not any((tmp_path / d).exists() for d in "etmrfs")


def test_every_number_in_the_settings_has_a_range_and_files_read_numbers_written_as_text(tmp_path):
    """A new numeric setting cannot be added without its range (seeds take any whole number);
    YAML reads 1e-2 as text (its floats need a dot): a settings file's numbers written so are
    numbers, and what is not a number is named."""
    import dataclasses

    from sd4match.config import EvalConfig, MatchConfig, ModelConfig, TrainConfig, field_base_type, load_train_config
    from sd4match.errors import Sd4MatchError

    unbounded = [f"{c.__name__}.{f.name}" for c in (MatchConfig, ModelConfig, EvalConfig, TrainConfig) for f in dataclasses.fields(c)
                 if field_base_type(c, f) in (int, float) and f.metadata.get("at_least") is None and f.metadata.get("above") is None]
    assert unbounded == ["EvalConfig.seed", "TrainConfig.seed"]
    (tmp_path / "t.yaml").write_text("lr: 1e-2\nsteps: '40'\nepochs: 0\n")
    cfg = load_train_config(yaml_file=tmp_path / "t.yaml", root="x")
    assert (cfg.lr, cfg.steps, cfg.epochs) == (0.01, 40, 0.0) and type(cfg.epochs) is float
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbflr: 1e-2\r\nsteps: 40\r\n")  # saved by a Windows editor
    assert load_train_config(yaml_file=tmp_path / "bom.yaml", root="x").steps == 40
    (tmp_path / "bom.yaml").write_bytes("steps: 40\n".encode("utf-16"))
    with pytest.raises(Sd4MatchError, match=r"bom\.yaml: UTF-16 text"):
        load_train_config(yaml_file=tmp_path / "bom.yaml", root="x")
    (tmp_path / "flags.yaml").write_text("micro-batch: 3\nval_every: 0\n")  # keys spelt as the flags, or as the fields
    assert (load_train_config(yaml_file=tmp_path / "flags.yaml", root="x").micro_batch, load_train_config(yaml_file=tmp_path / "flags.yaml", root="x").val_every) == (3, 0)
    (tmp_path / "typo.yaml").write_text("1: 2\nlrr: 0.1\n")  # keys of two types: named, not a TypeError from sorting them
    with pytest.raises(Sd4MatchError, match=r"^unknown training setting 1; known: "):
        load_train_config(yaml_file=tmp_path / "typo.yaml", root="x")
    (tmp_path / "typo.yaml").write_text("lrr: 0.1\n")
    with pytest.raises(Sd4MatchError, match=r"^unknown training setting 'lrr' \(did you mean 'lr'\?\); known: "):
        load_train_config(yaml_file=tmp_path / "typo.yaml", root="x")
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(Sd4MatchError, match=r"^lr 'fast': expected a finite number$"):
        load_train_config(yaml_file=tmp_path / "bad.yaml", root="x")
    with pytest.raises(Sd4MatchError, match=r"^batch_size 9 is not a multiple of micro_batch 4: --micro-batch 1, 3 or 9 divides it$"):
        TrainConfig("pfwillow", "x", micro_batch=4)
    with pytest.raises(Sd4MatchError, match=r"^limit 2.5: expected a whole number$"):
        EvalConfig("pfwillow", "x", limit=2.5)
    got = ModelConfig(timestep=np.int64(50), ensemble=np.arange(3)[2])  # numpy's numbers are numbers: kept as Python's
    assert (got.timestep, got.ensemble) == (50, 2) and type(got.timestep) is int
    with pytest.raises(Sd4MatchError, match=r"^alphas 0.1, 2: each must lie in \(0, 1\]$"):
        EvalConfig("pfwillow", "x", alphas=(0.1, 2))


def test_settings_files_hold_lists_as_text_and_switches_as_words(tmp_path):
    """A settings file's `exclude_categories: cat,dog` is the two names the flag would give
    (before: its characters, so 'cat' excluded nothing); `apply_flip: yes`, 'no', 1 are
    switches, 'maybe' is named (before: kept as a string, true whatever it said); a YAML
    syntax error is one line with its place (before: YAML's lines and caret)."""
    from sd4match.config import EvalConfig, TrainConfig, load_train_config
    from sd4match.errors import Sd4MatchError

    (tmp_path / "t.yaml").write_text("exclude_categories: cat, dog\ncategories: [bird]\nlora_targets: to_q\napply_flip: 'no'\ncpm_plain: 1\n"
                                     "all_pairs: yes\n")
    cfg = load_train_config(yaml_file=tmp_path / "t.yaml", root="x")
    assert (cfg.exclude_categories, cfg.categories, cfg.lora_targets) == (("cat", "dog"), ("bird",), ("to_q",))
    assert (cfg.apply_flip, cfg.cpm_plain, cfg.all_pairs) == (False, True, True)
    assert TrainConfig.from_dict({"root": "x", "apply_flip": "On"}).apply_flip is True
    for text, msg in (("apply_flip: maybe\n", r"^apply-flip 'maybe': expected true or false$"),
                      ("cpm_plain: 2\n", r"^cpm-plain 2: expected true or false$"),
                      ("categories: {a: 1}\n", r"^categories \{'a': 1\}: expected a list or comma-separated text$"),
                      ("categories: [1, 2]\n", r"^categories \[1, 2\]: expected names$"),
                      ("lr: 0.01\n  bad: [\n", r"t.yaml: not valid YAML at line 2, column 6 \(mapping values are not allowed here\)$")):
        (tmp_path / "t.yaml").write_text(text)
        with pytest.raises(Sd4MatchError, match=msg):
            load_train_config(yaml_file=tmp_path / "t.yaml", root="x")
    assert EvalConfig("pfwillow", "x", alphas="0.05,0.1").alphas == (0.05, 0.1)  # as --alphas reads it (before: ValueError on '.')
    assert EvalConfig("pfwillow", "x", alphas=[0.1]).alphas == (0.1,)
    assert EvalConfig("pfwillow", "x", alphas="0.1,0.10,0.05").alphas == EvalConfig("pfwillow", "x", alphas=[0.1, 0.1, 0.05]).alphas == (0.1, 0.05)
    with pytest.raises(Sd4MatchError, match=r"^alphas 'a,b': 'a,b' is not a comma-separated list of numbers$"):
        EvalConfig("pfwillow", "x", alphas="a,b")


def test_an_output_file_that_is_a_folder_is_named(tmp_path, willow_root, capsys):
    """score --out/--plot and pairs --out naming a folder, or a path under a file, and compare
    --out naming a file: one line naming the flag (before: errno text about a hidden
    temporary file, '/x/.e1.1234.5678.tmp: Is a directory', or 'File exists')."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    rows = "\n".join(json.dumps({"id": str(i), "kps": [[0.0, 0.0]] * 10}) for i in range(450))
    (tmp_path / "p.jsonl").write_text(rows + "\n")
    data = ["--dataset", "pfwillow", "--root", str(willow_root), "--split", "test"]
    folder, under_file = tmp_path / "folder", tmp_path / "file" / "x.json"
    for argv, line in (
        (["score", *data, "--predictions", str(tmp_path / "p.jsonl"), "--out", str(folder)],
         f"--out {folder}: is a folder; name a file in it (e.g. {folder / 'score.json'})"),
        (["score", *data, "--predictions", str(tmp_path / "p.jsonl"), "--plot", str(folder)],
         f"--plot {folder}: is a folder; name a file in it (e.g. {folder / 'bars.png'})"),
        (["score", *data, "--predictions", str(tmp_path / "p.jsonl"), "--out", str(under_file)], f"--out {under_file}: {tmp_path / 'file'} is a file, not a folder"),
        (["pairs", *data, "--out", str(folder)], f"--out {folder}: is a folder; name a file in it (e.g. {folder / 'pairs.jsonl'})"),
        (["compare", str(folder), "--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'}: exists and is not a folder"),
        (["compare", str(folder), "--out", str(under_file)], f"--out {under_file}: {tmp_path / 'file'} is a file, not a folder"),
        (["download", "pfwillow", "--root", str(tmp_path / "file"), "--no-progress"], f"--root {tmp_path / 'file'}: exists and is not a folder"),
        (["download", "pfwillow", "--root", str(under_file), "--no-progress"], f"--root {under_file}: {tmp_path / 'file'} is a file, not a folder"),
        (["datasets", "prepare", "ap10k", "--from", str(folder), "--root", str(tmp_path / "file")], f"--root {tmp_path / 'file'}: exists and is not a folder"),
        (["evaluate", *data, "--model", "effnet-lite0", "--out", str(tmp_path / "ev"), "--cache-dir", str(tmp_path / "file")],
         f"--cache-dir {tmp_path / 'file'}: exists and is not a folder"),  # before: errno text, after the model loaded
        (["train", "--dataset", "synthetic", "--root", str(willow_root), "--val-every", "0", "--model", "effnet-lite0",
          "--out", str(tmp_path / "tr"), "--cache-dir", str(under_file)], f"--cache-dir {under_file}: {tmp_path / 'file'} is a file, not a folder"),
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"sd4match: error: {line}"
    assert list(folder.iterdir()) == [] and (tmp_path / "file").read_text() == "x"


def test_training_on_a_test_split_or_validating_on_the_training_one_is_warned(tmp_path, willow_root, fixture_images, monkeypatch, capsys):
    """A prompt trained on a benchmark's test split scores that split without holding it
    out; validating on the training split chooses best/ on learned pairs: each is one
    warning line before training (synthetic warps of one's own pictures are not warned)."""
    import sd4match.train
    from sd4match.testing import tiny_sd

    class NoTraining:
        def __init__(self, cfg, out, progress=True):
            self.out = out

        def run(self, resume=False):
            return self.out

    monkeypatch.setattr(sd4match.train, "Trainer", NoTraining)
    model = tiny_sd(tmp_path / "sd")
    base = ["train", "--model", str(model), "--steps", "1", "--no-progress"]
    cases = ((["--dataset", "pfwillow", "--root", str(willow_root), "--train-split", "test", "--val-split", "test"],
              "sd4match: warning: training on pfwillow's test split: its scores on that split are no longer held out, "
              "and not comparable with published numbers"),
             (["--dataset", "synthetic", "--root", str(fixture_images), "--train-split", "trn", "--val-split", "trn"],
              "sd4match: warning: validating on the training split (trn): best/ is chosen on pairs it learned from"),
             (["--dataset", "synthetic", "--root", str(fixture_images), "--train-split", "test", "--val-split", "val"], None))
    for i, (argv, line) in enumerate(cases):
        assert main(base + argv + ["--out", str(tmp_path / f"run{i}")]) == 0
        warned = [w for w in capsys.readouterr().err.splitlines() if w.startswith("sd4match: warning:")]
        assert warned == ([line] if line else [])


def test_a_category_is_asked_for_before_the_model_loads_and_an_unused_one_is_named(tmp_path, fixture_images, no_model_load, capsys):
    """match / transfer / serve take one --category: a prompt that needs one and lacks it is
    named before the model loads (before: after it), and a --category the prompt never reads
    is a warning (before: silently ignored)."""
    from sd4match.prompts import parse_prompt

    assert [parse_prompt(p).requires_category for p in ("empty", "text", "text:a photo of a cat", "text:a {{category}} photo", "text:{category}")] == [
        False, True, False, False, True]
    a, b = str(fixture_images / "cat.jpg"), str(fixture_images / "pets.jpg")
    assert main(["match", a, b, "--prompt", "text:a photo of a {category}", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == "sd4match: error: --prompt text:a photo of a {category}: this prompt needs --category"
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["match", a, b, "--prompt", "text:a photo of a cat", "--category", "dog", "--out", str(tmp_path / "m")])
    assert "sd4match: warning: --category dog changes nothing with --prompt text:a photo of a cat" in capsys.readouterr().err


def test_apply_flip_where_no_pair_is_marked_is_a_warning(tmp_path, willow_root):
    rc, _, err = here("pairs", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--apply-flip", "--out", tmp_path / "p.jsonl")
    assert rc == 0 and "sd4match: warning: --apply-flip changes nothing: no pair of pfwillow/test is marked to be mirrored" in err
    rc, _, err = here("pairs", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--out", tmp_path / "q.jsonl")
    assert rc == 0 and "warning" not in err and (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "q.jsonl").read_bytes()


def test_rule_settings_the_rule_never_reads_are_named(tmp_path, fixture_images, willow_root, no_model_load, capsys):
    """--temperature with --match nn, --sigma with softargmax: one warning before the model
    loads (they changed nothing, silently); --match all reads both."""
    from sd4match.config import unused_rule_settings

    assert unused_rule_settings("nn", 0.01, 3.0) == ["--temperature", "--sigma"] and unused_rule_settings("softargmax", 0.01, 3.0) == ["--sigma"]
    assert unused_rule_settings("kernel-softargmax", 0.01, 3.0) == unused_rule_settings("all", 0.01, 3.0) == unused_rule_settings("nn", 0.04, 7.0) == []
    with pytest.raises(AssertionError):
        main(["match", str(fixture_images / "cat.jpg"), str(fixture_images / "pets.jpg"), "--match", "nn", "--temperature", "0.01", "--out", str(tmp_path / "m")])
    assert "sd4match: warning: --temperature changes nothing with --match nn" in capsys.readouterr().err
    with pytest.raises(AssertionError):
        main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--match", "softargmax", "--sigma", "3",
              "--model", "effnet-lite0", "--out", str(tmp_path / "e")])
    assert "sd4match: warning: --sigma changes nothing with --match softargmax" in capsys.readouterr().err
