"""What a new user trips over, one test per case (issue: output folders, checks before a model
loads, honest messages)."""

import json
import shutil
from pathlib import Path

import pytest

from sd4match.cli import main
from sd4match.errors import Sd4MatchError

from conftest import hold_lock

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_datasets_check_counts_missing_pictures_and_names_missing_annotations(spair_root, pascal_lists, tmp_path, capsys):
    # SPair-71k without JPEGImages/: "0 of 58 found", non-zero exit
    assert main(["datasets", "check", "--dataset", "spair", "--root", str(spair_root), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "images: 0 of 58 referenced found (58 missing)" in out and "decoded" in out
    # PF-Pascal with its three lists but no annotations or pictures: says so, not "trn missing"
    root = tmp_path / "pf-pascal"
    root.mkdir()
    for f in pascal_lists.glob("*_pairs.csv"):
        shutil.copy(f, root / f.name)
    assert main(["datasets", "check", "--dataset", "pfpascal", "--root", str(root), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "trn   unreadable: PF-dataset-PASCAL/JPEGImages and PF-dataset-PASCAL/Annotations missing" in out
    assert "trn   missing" not in out


def test_score_allow_missing_counts_the_missing_pairs(willow_root, tmp_path, capsys):
    from sd4match.data import open_dataset

    recs = open_dataset("pfwillow", willow_root).pairs("test")
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": r.id, "kps": r.trg_kps.tolist()}) + "\n" for r in recs[1:]))
    args = ["score", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--predictions", str(preds), "--allow-missing"]
    assert main(args) == 0
    assert "missing: 1 of the 450 pairs have no prediction (scored 0)" in capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_missing"] == 1 and doc["n_pairs"] == 450
    assert doc["per_image"]["all"]["0.05"] == pytest.approx(449 / 450)  # the missing pair scores 0


def test_empty_points_is_an_error_not_automatic_points(tmp_path, capsys):
    assert main(["match", str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "pets.jpg"), "--points", "", "--out", str(tmp_path / "o"),
                 "--model", "effnet-lite0"]) == 2
    assert "--points: no points given" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prompt_of_another_model_warns_naming_both(tmp_path, capsys):
    """A prompt folder records its model; used with another model of the same text width, one
    warning line names both."""
    from sd4match.features import SDFeaturizer
    from sd4match.prompts import make_prompt
    from sd4match.testing import tiny_sd

    a, b = tiny_sd(tmp_path / "a"), tiny_sd(tmp_path / "b", seed=1)
    fa = SDFeaturizer.from_pretrained(a, resolution=64, ensemble=1)
    p = make_prompt("single", fa)
    p.config.model = fa.model_id
    p.save(tmp_path / "prompt")
    assert main(["match", str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "pets.jpg"), "--points", "100,100", "--prompt", str(tmp_path / "prompt"),
                 "--model", str(b), "--resolution", "64", "--ensemble", "1", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    mine = [line for line in err.splitlines() if "sd4match" in line.lower() and "warning" in line.lower()]
    assert len(mine) == 1 and mine[0].startswith("sd4match: warning: ") and str(a.resolve()) in mine[0] and str(b.resolve()) in mine[0]
    assert "Sd4MatchWarning" not in err


def test_damaged_newest_checkpoint_is_one_warning_line(willow_root, tmp_path, capsys):
    from sd4match.testing import tiny_sd

    model = tiny_sd(tmp_path / "m")
    base = ["train", "--dataset", "synthetic", "--root", str(willow_root), "--prompt", "single", "--model", str(model), "--resolution", "64",
            "--batch-size", "1", "--val-every", "0", "--ckpt-every", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(base + ["--steps", "2"]) == 0
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    (newest / "state.safetensors").write_bytes(b"cut short")
    capsys.readouterr()
    assert main(base + ["--steps", "3", "--resume"]) == 0
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if "falling back to the checkpoint" in line]
    assert len(warn) == 1 and warn[0].startswith("sd4match: warning: ") and newest.name in warn[0]
    assert "Sd4MatchWarning" not in err and "train.py" not in err


def test_a_second_evaluation_into_a_running_ones_folder_is_refused(willow_root, tmp_path, capsys):
    """While a run holds the folder's lock (here another open file description holds it, as a
    second process would see it), `evaluate` is refused in one line, before any model loads;
    once the holder is gone the folder is free again."""
    out = tmp_path / "eval"
    holder = hold_lock(out)
    args = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", "effnet-lite0", "--limit", "3",
            "--match", "nn", "--no-progress", "--out", str(out)]
    try:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"sd4match: error: {out}: another evaluation is writing here (pid 4242); wait for it to end or choose another --out"
    finally:
        holder.close()
    assert main(args) == 0 and (out / "score.json").is_file()


def test_a_second_training_run_into_a_running_ones_folder_is_refused(willow_root, tmp_path, capsys, no_model_load):
    """`train` held no lock: a job submitted twice (or requeued beside the first) trained into
    the same folder, and with --resume-or-start before the first checkpoint it deleted the
    running one's scalars.jsonl and config.json. Now one line, before any model loads, and
    nothing of the running one is touched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "scalars.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (out / "config.json").write_text("{}")
    holder = hold_lock(out)
    try:
        for flag in ("--resume-or-start", "--resume"):
            assert main(["train", "--dataset", "synthetic", "--root", str(willow_root), "--prompt", "single", "--model", "effnet-lite0", "--steps", "1",
                         "--val-every", "0", "--device", "cpu", "--no-progress", "--out", str(out), flag]) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"sd4match: error: {out}: another training run is writing here (pid 4242); wait for it to end or choose another --out"
            assert (out / "scalars.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n' and (out / "config.json").read_text() == "{}"
    finally:
        holder.close()


def test_a_second_sweep_or_reproduction_into_a_running_ones_folder_is_refused(willow_root, tmp_path, capsys, no_model_load):
    """Two sweeps (or reproductions) into one folder both evaluated the whole grid, each
    writing the same files; now the second is refused in one line before any model loads
    (the Python functions too)."""
    from sd4match.config import EvalConfig
    from sd4match.reproduce import reproduce
    from sd4match.sweep import sweep

    data = ["--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--limit", "2", "--no-progress"]
    zipped = tmp_path / "pretrained_prompts.zip"
    zipped.write_bytes(b"")
    for what, argv in (("sweep", ["sweep", *data, "--timesteps", "50", "--up-blocks", "1", "--prompt", "empty"]),
                       ("reproduction", ["reproduce", "--prompts", str(zipped), "--pfwillow", str(willow_root), "--no-progress"])):
        out = tmp_path / what
        holder = hold_lock(out)
        try:
            assert main([*argv, "--out", str(out)]) == 2
            assert capsys.readouterr().err.strip() == f"sd4match: error: {out}: another {what} is writing here (pid 4242); wait for it to end or choose another --out"
            with pytest.raises(Sd4MatchError, match=f"another {what} is writing here"):
                if what == "sweep":
                    sweep(object(), EvalConfig("pfwillow", str(willow_root)), out, timesteps=[50], up_blocks=[1])
                else:
                    reproduce(zipped, {}, out, load_model=None, load_dino=None, model_settings={})
        finally:
            holder.close()
        assert [p.name for p in out.iterdir()] == [".sd4match.lock"]


def test_output_folders_hold_one_run(tmp_path, capsys):
    """match without --dense into an earlier --dense run's folder, and transfer onto other
    targets into an earlier transfer's folder: only this run's files remain (a file the user
    put there stays)."""
    out = tmp_path / "o"
    common = ["--model", "effnet-lite0", "--points", "100,100;200,150"]
    assert main(["match", str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "pets.jpg"), "--dense", "--out", str(out), *common]) == 0
    assert {"warped.png", "confidence.png", "dense.npz", "matches.json", "matches.png"} <= {p.name for p in out.iterdir()}
    (out / "my-notes.txt").write_text("mine")
    assert main(["match", str(EXAMPLES / "bird.jpg"), str(EXAMPLES / "owl.jpg"), "--out", str(out), *common]) == 0
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"matches.json", "matches.png", "my-notes.txt"}
    assert json.loads((out / "matches.json").read_text())["source"]["path"].endswith("bird.jpg")

    t1, t2, tout = tmp_path / "t1", tmp_path / "t2", tmp_path / "transfer"
    for d, names in ((t1, ("pets.jpg", "owl.jpg")), (t2, ("bird.jpg",))):
        d.mkdir()
        for n in names:
            shutil.copy(EXAMPLES / n, d / n)
    base = ["transfer", "--source", str(EXAMPLES / "cat.jpg"), "--points", "100,100", "--model", "effnet-lite0", "--no-progress", "--out", str(tout)]
    assert main([*base, "--targets", str(t1)]) == 0
    assert {p.name for p in tout.iterdir() if not p.name.startswith(".")} == {"pets.json", "owl.json", "coco.json", "sheet.png"}
    assert main([*base, "--targets", str(t2)]) == 0
    assert {p.name for p in tout.iterdir() if not p.name.startswith(".")} == {"bird.json", "coco.json", "sheet.png"}


def test_missing_pictures_are_named_before_any_model_loads_and_a_failed_start_blocks_nothing(spair_root, spair_with_images, tmp_path, capsys,
                                                                                             monkeypatch):
    """train and evaluate on an SPair-71k root without its pictures: one line naming the first
    missing picture and the count, before any model is loaded (the model source here does not
    even exist as weights); the failed train leaves nothing that blocks a rerun."""
    from sd4match.testing import tiny_sd

    model = tiny_sd(tmp_path / "m")
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("sd4match.cli.load_model", no_model)
    monkeypatch.setattr("sd4match.train.load_featurizer", no_model)
    run = tmp_path / "run"
    train = ["train", "--preset", "single-spair", "--root", str(spair_root), "--model", str(model), "--device", "cpu", "--no-progress",
             "--out", str(run)]
    assert main(train) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sd4match: error: ") and "JPEGImages" in err and "image file is missing" in err and "pictures these pairs read are missing" in err and "\n" not in err
    assert not run.exists() or not any(run.iterdir())
    assert main(["evaluate", "--dataset", "spair", "--root", str(spair_root), "--split", "test", "--model", str(model), "--out",
                 str(tmp_path / "ev"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sd4match: error: ") and "image file is missing (52 of the 52 pictures these pairs read are missing" in err and "\n" not in err
    # a run folder from a start that failed before its first step does not block the rerun
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text("{}")
    (run / "scalars.jsonl").write_text("")
    monkeypatch.undo()
    assert main(["train", "--dataset", "spair", "--root", str(spair_with_images), "--prompt", "single", "--model", str(model), "--resolution", "64",
                 "--steps", "1", "--batch-size", "1", "--val-every", "0", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    assert (run / "last" / "prompt.safetensors").is_file()


def test_uncached_weights_without_a_network_fail_after_one_probe(tmp_path, monkeypatch):
    """Not cached and not offline: the cache is tried first (no network), then one
    reachability probe, then the one-line error; the libraries never get to retry the hub."""
    import socket

    import transformers
    from huggingface_hub import constants

    from sd4match.errors import Sd4MatchError
    from sd4match.features import DinoFeaturizer

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probes, loads = [], []

    def no_network(*a, **k):
        probes.append(a)
        raise OSError("network is unreachable")

    real = transformers.Dinov2Model.from_pretrained

    def counted(*a, **k):
        loads.append(k.get("local_files_only"))
        return real(*a, **k)

    from sd4match.features import registry

    reach = registry.hub_reachable
    checks = []
    monkeypatch.setattr(registry, "hub_reachable", lambda *a, **k: checks.append(1) or reach(*a, **k))
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(transformers.Dinov2Model, "from_pretrained", counted)
    with pytest.raises(Sd4MatchError, match=r"DINOv2 weights facebook/dinov2-base \(dinov2-b\) are not cached and the hub could not be reached"):
        DinoFeaturizer.from_pretrained("dinov2-b")
    assert checks == [1] and loads == [True]  # the cache only, one probe; the libraries' download path (and its retries) never started
    assert any(a[0] == ("huggingface.co", 443) for a in probes)


def test_a_download_is_announced_before_it_starts(monkeypatch, capsys):
    """A first run downloads gigabytes before it writes anything: it said nothing (the
    libraries' bars are off while weights load), so it looked hung. One line now, before the
    download, naming the weights and where they go; none when they are cached."""
    from huggingface_hub import constants

    from sd4match.features import registry

    res = registry.resolve("sd-2-1")
    monkeypatch.setattr(registry, "hub_reachable", lambda *a, **k: True)
    calls = []

    def load(local):
        calls.append(local)
        if local:
            raise OSError("not in the cache")
        assert capsys.readouterr().err == (f"sd4match: Stable Diffusion weights {res.model_id} are not cached here: downloading them into "
                                           f"{constants.HF_HUB_CACHE} (once; later runs read them there)\n")
        return "weights"

    assert registry.load_from_hub(load, "Stable Diffusion", res, offline=False) == "weights" and calls == [True, False]
    assert registry.load_from_hub(lambda local: "cached", "Stable Diffusion", res, offline=False) == "cached"
    assert capsys.readouterr().err == ""


def test_pictures_explain_themselves():
    """Close scores get one colour on a readable scale; serve opens on a pair of the same kind."""
    from sd4match.serve import opening_pair
    from sd4match.viz import MIN_SPAN, score_range

    lo, hi = score_range([0.2412, 0.2438])
    assert hi - lo == pytest.approx(MIN_SPAN) and lo < 0.2412 < 0.2438 < hi and f"{lo:.2f}" != f"{hi:.2f}"
    assert score_range([0.1, 0.9]) == (0.1, 0.9)
    names = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert names[:2] == ["bird.jpg", "cat.jpg"]  # alphabetical order would open on a bird and a cat
    assert opening_pair(EXAMPLES, names) == ["cat.jpg", "pets.jpg"]
    assert opening_pair(Path("/nonexistent"), names) == names[:2]


def test_store_entries_hold_only_their_own_bytes():
    """A map stored as a row of a batch's output is copied out: the batch is not kept alive
    behind the store's byte count."""
    import torch

    from sd4match.store import Store

    batch = torch.zeros(32, 64, 16, 16)  # 2 MiB
    s = Store(max_bytes=1 << 20)
    s.put("features", "k", {"features": batch[3:4]})
    got = s.get("features", "k")["features"]
    assert got.untyped_storage().nbytes() == got.numel() * got.element_size() == s.nbytes == 64 * 16 * 16 * 4
    whole = torch.zeros(8, 8)
    s.put("features", "w", {"features": whole})
    assert s.get("features", "w")["features"].data_ptr() == whole.data_ptr()  # a tensor that owns its storage is kept as it is


def test_the_recorded_git_commit_is_sd4match_s_own_not_a_surrounding_project_s(tmp_path, monkeypatch):
    """score.json and config.json record git_sha(): an installed copy inside a user's project
    (its .venv in the project's repository) recorded the project's commit as sd4match's."""
    import subprocess

    from sd4match import runtime

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "tracked.py").write_text("")
    git("add", "tracked.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    (tmp_path / ".venv" / "sd4match").mkdir(parents=True)
    (tmp_path / ".venv" / "sd4match" / "runtime.py").write_text("")
    monkeypatch.setattr(runtime, "__file__", str(tmp_path / ".venv" / "sd4match" / "runtime.py"))
    assert runtime.git_sha() is None  # not tracked there: not the project's commit
    monkeypatch.setattr(runtime, "__file__", str(tmp_path / "tracked.py"))
    assert runtime.git_sha() == git("rev-parse", "HEAD")  # a checkout: its commit
