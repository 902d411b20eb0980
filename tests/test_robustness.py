"""No lost work, no surprises: one test per problem a new user met (the robustness issue's
table), through the command line, on the real PF-Willow fixture with a tiny random SD."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sd4match.cli import main
from sd4match.testing import tiny_sd

FAST = ["--resolution", "64", "--ensemble", "1", "--device", "cpu"]


def run(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "sd4match", *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sd4match: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives: only decoding finds it


# ------------------------------------------------------------------------------ before any model loads
def test_missing_picture_is_named_in_seconds_before_any_model_loads(tmp_path, willow_root):
    b = willow_root / "PF-dataset" / "car(G)" / "Cars_007a.png"
    t0 = time.perf_counter()
    rc, _, err = run("match", tmp_path / "nope.jpg", b, "--out", tmp_path / "o", env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    took = time.perf_counter() - t0
    line = one_error_line(err)
    assert rc == 2 and "nope.jpg: image file is missing" in line and "Stable Diffusion" not in err
    assert took < 20, took  # a fresh interpreter and the imports; no hub, no weights
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["gpu0", "mps", "cuda:7"])
def test_unusable_device_is_refused_in_one_line(tmp_path, willow_root, device):
    a = willow_root / "PF-dataset" / "car(G)" / "Cars_006a.png"
    rc, _, err = run("match", a, a, "--device", device, "--out", tmp_path / "o")
    line = one_error_line(err)
    assert rc == 2 and f"--device {device}" in line and "cpu" in line  # says what is available


def test_version_and_help_state_defaults_and_protocols():
    rc, out, _ = run("--version")
    assert rc == 0 and out.startswith("sd4match 0.") and "torch" in out
    ev, sc = (" ".join(run(c, "--help")[1].split()) for c in ("evaluate", "score"))  # help wraps lines
    assert "(default: sd4match)" in ev and "(default: standard)" in sc and "official SD4Match code's frame" in ev
    assert "(default: kernel-softargmax)" in ev and "(default: auto)" in ev
    _, tr, _ = run("train", "--help")
    assert "--resume-or-start" in tr and "DESIGN.md" not in tr + ev


def test_bad_prompt_folder_and_dataset_layout_named_before_loading(tmp_path, willow_root):
    rc, _, err = run("evaluate", "--dataset", "pfwillow", "--root", tmp_path, "--split", "test", "--out", tmp_path / "o")
    assert rc == 2 and str(tmp_path) in one_error_line(err)
    (tmp_path / "p").mkdir()
    rc, _, err = run("evaluate", "--dataset", "pfwillow", "--root", willow_root, "--split", "test", "--prompt", tmp_path / "p", "--out", tmp_path / "o")
    assert rc == 2 and "config.json is missing" in one_error_line(err)


# ------------------------------------------------------------------------------ evaluate keeps what it did
def _willow_copy(tmp_path, willow_root):
    root = tmp_path / "willow"
    shutil.copytree(willow_root, root)
    return root


def _eval_args(tiny, root, out, *extra):
    return ["evaluate", "--dataset", "pfwillow", "--root", str(root), "--split", "test", "--model", str(tiny), *FAST, "--prompt", "empty",
            "--no-progress", "--out", str(out), "--workers", "2", *extra]


def _first_use(root, image_rel):
    from sd4match.data import open_dataset

    recs = open_dataset("pfwillow", root).pairs("test")
    return next(i for i, r in enumerate(recs) if image_rel in (r.src, r.trg))


def test_evaluate_keeps_predictions_on_a_bad_image_and_resume_equals_a_clean_run(tmp_path, willow_root, tiny, capsys):
    clean = tmp_path / "clean"
    assert main(_eval_args(tiny, willow_root, clean)) == 0
    work = json.loads((clean / "run-info.json").read_text())["stream"]["work"]  # 50 pictures: 7 VAE calls of 8, 6 of them padding
    assert work["vae"] == {"calls": 7, "items": 56, "padded": 6} and work["unet"]["items"] == 32 * work["unet"]["calls"]
    assert json.loads((clean / "score.json").read_text())["run"]["config"]["settings"]["vae_call"] == 8  # the call size is part of what made the numbers
    root = _willow_copy(tmp_path, willow_root)
    rel = "PF-dataset/winebottle(wC)/246_0042.png"
    first = _first_use(root, rel)
    assert first > 300  # the bad picture is met late in the run (pair 364 of 450)
    good = (root / rel).read_bytes()
    truncate(root / rel)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_eval_args(tiny, root, out)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "246_0042.png" in line and f"pair {first}:" in line and "--resume" in line
    kept = (out / "predictions.partial.jsonl").read_text().splitlines()
    assert len(kept) >= first - 64 and not (out / "score.json").exists()  # the pairs before it are kept (up to the loader's look-ahead)
    # --skip-bad goes past it, scores its pairs as missing and lists them
    skip = tmp_path / "skip"
    assert main(_eval_args(tiny, root, skip, "--skip-bad")) == 0
    res = json.loads((skip / "score.json").read_text())
    assert res["skipped"] and all("246_0042.png" in s["problem"] for s in res["skipped"]) and res["skipped"][0]["id"] == str(first)
    # fix the picture, resume: identical to the clean run
    (root / rel).write_bytes(good)
    assert main(_eval_args(tiny, root, out, "--resume")) == 0
    assert (out / "predictions.jsonl").read_bytes() == (clean / "predictions.jsonl").read_bytes()
    assert (out / "score.json").read_bytes() == (clean / "score.json").read_bytes()  # run-specific facts live in run-info.json
    assert json.loads((out / "run-info.json").read_text())["seconds_this_session"] >= 0
    a, b = json.loads((out / "score.json").read_text()), json.loads((clean / "score.json").read_text())
    assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}
    assert not (out / "predictions.partial.jsonl").exists()


@pytest.mark.long
def test_evaluate_killed_at_a_pair_then_resumed_equals_a_clean_run(tmp_path, willow_root, tiny):
    clean = tmp_path / "clean"
    assert main(_eval_args(tiny, willow_root, clean)) == 0
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "sd4match", *_eval_args(tiny, willow_root, out)], env={**os.environ, "SD4MATCH_TEST_HANG": "pair:300"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (out / ".test-hang").exists():
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len((out / "predictions.partial.jsonl").read_text().splitlines()) == 300
    rc, _, err = run(*_eval_args(tiny, willow_root, out))  # no --resume: refused, nothing lost
    assert rc == 2 and "--resume" in one_error_line(err)
    rc, _, err = run(*_eval_args(tiny, willow_root, out, "--resume", "--timestep", "50"))  # other settings: refused
    assert rc == 2 and "timestep" in one_error_line(err)
    assert main(_eval_args(tiny, willow_root, out, "--resume")) == 0
    assert (out / "predictions.jsonl").read_bytes() == (clean / "predictions.jsonl").read_bytes()
    assert (out / "score.json").read_bytes() == (clean / "score.json").read_bytes()  # run-specific facts live in run-info.json
    assert json.loads((out / "run-info.json").read_text())["seconds_this_session"] >= 0


def _default_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.long
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_evaluate_stopped_by_a_signal_says_how_to_continue(tmp_path, willow_root, tiny, sig):
    """A scheduler's SIGTERM or a Ctrl-C mid-evaluation: the pairs done stay in the partial file
    and the one line says where and how to continue (before: SIGTERM ended the process without
    a word, Ctrl-C said 'interrupted')."""
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-m", "sd4match", *_eval_args(tiny, willow_root, out, "--limit", "20")],
                         env={**os.environ, "SD4MATCH_TEST_HANG": "pair:5"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=_default_signals)  # as a terminal starts it: a background job's runner may ignore Ctrl-C
    while not (out / ".test-hang").exists():
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(0.02)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1].decode()
    assert p.returncode == 128 + sig
    what = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted"
    assert one_error_line(err.replace("sd4match: ", "sd4match: error: ", 1)) == (
        f"sd4match: error: {what}; what was done is kept in {out}: the same command with --resume continues it")
    assert len((out / "predictions.partial.jsonl").read_text().splitlines()) == 5


# ------------------------------------------------------------------------------ failures damage nothing
def test_failed_transfer_leaves_an_earlier_output_folder_byte_identical(tmp_path, willow_root, tiny):
    src = willow_root / "PF-dataset" / "car(G)" / "Cars_006a.png"
    targets = tmp_path / "targets"
    targets.mkdir()
    for f in sorted((willow_root / "PF-dataset" / "car(S)").glob("*.png"))[:3]:
        shutil.copy(f, targets / f.name)
    out = tmp_path / "out"
    args = ["transfer", "--source", str(src), "--points", "10,10;100,80", "--targets", str(targets), "--model", str(tiny), *FAST, "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "sheet.png" in before and "coco.json" in before and len([n for n in before if not n.startswith(".")]) == 5
    shutil.copy(sorted((willow_root / "PF-dataset" / "duck(S)").glob("*.png"))[0], targets / "zz_new.png")
    truncate(targets / "zz_new.png")  # header fine: it fails in the middle of the run
    assert main(args) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.staging-*"))


# ------------------------------------------------------------------------------ training runs
def _train(tiny, root, out, *extra):
    """``sd4match train`` in this process (faster than a fresh interpreter): exit code, stderr."""
    import contextlib
    import io
    import warnings

    args = ["train", "--dataset", "synthetic", "--root", root, "--prompt", "single", "--model", tiny, "--resolution", "64", "--steps", "6",
            "--batch-size", "2", "--micro-batch", "1", "--val-every", "0", "--ckpt-every", "3", "--device", "cpu", "--no-progress", "--out", out, *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([str(a) for a in args])
    return rc, None, err.getvalue() + "".join(f"warning: {w.message}\n" for w in caught if "falling back" in str(w.message))


def _steps(out):
    return [json.loads(l)["step"] for l in (out / "scalars.jsonl").read_text().splitlines()]


@pytest.mark.long
def test_training_run_folders_resume_and_extend(tmp_path, willow_root, tiny):
    out = tmp_path / "run"
    # killed before its first checkpoint (after step 2): --resume says so; --resume-or-start starts again
    p = subprocess.Popen([sys.executable, "-m", "sd4match", "train", "--dataset", "synthetic", "--root", str(willow_root), "--prompt", "single",
                          "--model", str(tiny), "--resolution", "64", "--steps", "6", "--batch-size", "2", "--micro-batch", "1", "--val-every", "0",
                          "--ckpt-every", "3", "--device", "cpu", "--no-progress", "--out", str(out)],
                         env={**os.environ, "SD4MATCH_TEST_HANG": "step:2"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / ".test-hang").exists():
        assert p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    rc, _, err = run("train", "--dataset", "synthetic", "--root", willow_root, "--prompt", "single", "--model", tiny, "--device", "cpu", "--out", out,
                     "--resume")  # a fresh process, as a user runs it: one line, no traceback
    assert rc == 2 and "no checkpoint to resume from" in one_error_line(err) and "--resume-or-start" in err
    rc, _, err = _train(tiny, willow_root, out)  # a new run into that folder: refused
    assert rc == 2 and "earlier run's files" in err
    rc, _, err = _train(tiny, willow_root, out, "--resume-or-start")
    assert rc == 0, err
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # no step twice
    # extend the finished run: --steps may grow on resume; the log continues without repeats
    rc, _, err = _train(tiny, willow_root, out, "--resume", "--steps", "9")
    assert rc == 0, err
    assert _steps(out) == list(range(1, 10))
    # a damaged newest checkpoint: fall back to the one before it, with a warning naming it
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000006", "step-0000009"]
    (ckpts[-1] / "state.json").write_text("{ broken")
    rc, _, err = _train(tiny, willow_root, out, "--resume", "--steps", "12")
    assert rc == 0, err
    assert "step-0000009" in err and "falling back" in err
    assert _steps(out) == list(range(1, 13))


@pytest.mark.long
def test_training_stopped_by_sigterm_keeps_its_step_and_resumes_exactly(tmp_path, willow_root, tiny):
    """A scheduler's SIGTERM mid-run (a first Ctrl-C alike): the step in progress is finished,
    checkpointed and written to last/, and the process exits 143 naming --resume; resumed, the
    run equals one never stopped. Before, SIGTERM ended the process at once and every step
    since the last checkpoint (up to --ckpt-every 500) was lost."""
    from safetensors.torch import load_file

    clean = tmp_path / "clean"
    assert _train(tiny, willow_root, clean, "--steps", "4", "--ckpt-every", "100")[0] == 0
    out = tmp_path / "stopped"
    args = ["train", "--dataset", "synthetic", "--root", willow_root, "--prompt", "single", "--model", tiny, "--resolution", "64", "--steps", "4",
            "--batch-size", "2", "--micro-batch", "1", "--val-every", "0", "--ckpt-every", "100", "--device", "cpu", "--no-progress", "--out", out]
    p = subprocess.Popen([sys.executable, "-m", "sd4match", *map(str, args)], env={**os.environ, "SD4MATCH_TEST_HANG": "step:2"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_signals)
    while not (out / ".test-hang").exists():
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1].decode()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "sd4match: stopped: SIGTERM at step 2 of 4" in err and "--resume" in err and "Traceback" not in err
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-0000002"] and _steps(out) == [1, 2]
    assert (out / "last" / "prompt.safetensors").is_file()
    assert _train(tiny, willow_root, out, "--steps", "4", "--ckpt-every", "100", "--resume")[0] == 0
    assert _steps(out) == [1, 2, 3, 4]
    a, b = load_file(str(clean / "last" / "prompt.safetensors")), load_file(str(out / "last" / "prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_request_takes_the_first_signal_and_gives_the_handlers_back():
    """SIGTERM, then Ctrl-C: the first asks for a stop, the second Ctrl-C stops at once; the
    handlers found are put back; a signal the process ignores stays ignored."""
    from sd4match.runtime import StopRequest

    outer = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a terminal
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in the main thread between bytecodes
            assert stop.signal == "SIGTERM" and stop.agreed(1, "cpu")
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
            time.sleep(0.05)
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's Ctrl-C
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.signal is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer[0])
        signal.signal(signal.SIGTERM, outer[1])


def test_out_of_memory_is_one_line_naming_the_flags_that_lower_it_and_the_run_resumes(willow_root, tmp_path, capsys, monkeypatch):
    """A GPU's out-of-memory error (the most common failure on a smaller card) was a
    traceback. Now one line: torch's own first words (what it tried to allocate, of how
    much), the command's flags that lower its peak memory, and how to continue; the pairs done
    are kept, and --resume finishes with the predictions of a run never stopped."""
    import torch

    from sd4match.cli import main
    from sd4match.features.effnet import EffNetFeaturizer

    argv = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", "effnet-lite0", "--resolution", "128",
            "--limit", "12", "--match", "nn", "--device", "cpu", "--no-progress", "--max-batch", "2"]
    assert main([*argv, "--out", str(tmp_path / "clean")]) == 0
    real, calls = EffNetFeaturizer.forward, []

    def runs_out(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 11.75 GiB of which 1.20 GiB "
                                         "is free. Including non-PyTorch memory, this process has 10.50 GiB memory in use. Of the allocated memory ...")
        return real(self, *a, **k)

    monkeypatch.setattr(EffNetFeaturizer, "forward", runs_out)
    out = tmp_path / "oom"
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "sd4match: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 11.75 GiB of which 1.20 GiB "
        f"is free): lower --max-batch or --store-gb (stored maps stay on the device); --vae-batch too, in a new --out; what was done is kept in {out}: "
        "the same command with --resume continues it")
    assert (out / "predictions.partial.jsonl").read_text().count("\n") >= 1  # the pairs done before it
    monkeypatch.setattr(EffNetFeaturizer, "forward", real)
    assert main([*argv, "--out", str(out), "--resume", "--max-batch", "1"]) == 0
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "clean" / "predictions.jsonl").read_text()
    # a flag already at 1 is not named as one to lower
    from argparse import Namespace

    from sd4match.cli import _memory_hint

    assert _memory_hint(Namespace(command="train", micro_batch=1, max_batch=None, vae_batch=None, dtype="bf16")) == "lower --max-batch or --vae-batch"
    assert _memory_hint(Namespace(command="train", micro_batch=3, max_batch=None, vae_batch=1, dtype="fp32")) == (
        "lower --micro-batch or --max-batch; or use --dtype bf16 (fp16 on older GPUs)")
    assert _memory_hint(Namespace(command="evaluate", max_batch=1, vae_batch=1, store_gb=2.0, dtype=None)) == "lower --store-gb (stored maps stay on the device)"
    # other errors are not dressed up as memory: a RuntimeError of another kind stays a traceback
    monkeypatch.setattr(EffNetFeaturizer, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main([*argv, "--out", str(tmp_path / "other")])
