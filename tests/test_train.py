"""Training: learnability on real images, exact resume after SIGKILL, presets and settings."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sd4match.errors import Sd4MatchError
from sd4match.features import DinoFeaturizer, SDFeaturizer
from sd4match.testing import tiny_dinov2, tiny_sd
from sd4match.train import PRESETS, Trainer, TrainConfig, batch_indices, load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("m") / "sd2")


def learn(cfg, out, feat, dino=None):
    t = Trainer(cfg, out, featurizer=feat, dino=dino, progress=False)
    before = t.validate()
    losses = []
    while t.step < cfg.steps:
        losses.append(t.train_step())
    return before, t.validate(), sum(losses[:10]) / 10, sum(losses[-10:]) / 10


@pytest.mark.parametrize("kind", ["single", pytest.param("cpm", marks=pytest.mark.long)])  # cpm's loss falls in test_adapters too
def test_prompt_learns_on_synthetic_warps_of_real_images(kind, tiny, willow_root, tmp_path):
    """Warped PF-Willow photos, tiny random SD at 64 px (8 x 8 cells), 140 steps of 4 pairs.

    Held-out pairs come from other source images (the synthetic test split).
    """
    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    dino = DinoFeaturizer.from_pretrained(tiny_dinov2(tmp_path / "dino")) if kind == "cpm" else None
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt=kind, model=str(tiny), resolution=64, steps=140, batch_size=4,
                      micro_batch=4, val_every=0, ckpt_every=1000, device="cpu", val_split="test")
    before, after, first, last = learn(cfg, tmp_path / "run", feat, dino)
    print(f"{kind}: held-out PCK@0.1 {before:.4f} -> {after:.4f}; loss {first:.3f} -> {last:.3f}")
    assert last < 0.95 * first
    # measured on 2 CPU cores: single 0.1387 -> 0.1928 (loss 6.270 -> 5.352), cpm 0.1515 -> 0.2032 (6.220 -> 5.284); 20 held-out pairs
    assert after > before + (0.03 if kind == "single" else 0.02)


def test_batches_cover_each_epoch_once():
    n, b = 10, 4
    seen = [i for s in range(5) for i in batch_indices(n, 0, s, b)]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(n, 0, 3, b) == batch_indices(n, 0, 3, b)
    assert batch_indices(n, 1, 0, b) != batch_indices(n, 0, 0, b)


def _train_cmd(tiny, root, out, *extra):
    return [sys.executable, "-m", "sd4match", "train", "--dataset", "synthetic", "--root", str(root), "--prompt", "single", "--model", str(tiny),
            "--resolution", "64", "--steps", "16", "--batch-size", "2", "--micro-batch", "1", "--val-every", "0", "--ckpt-every", "2",
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


@pytest.mark.long
def test_sigkill_and_resume_is_bit_identical(tiny, willow_root, tmp_path):
    """Killed inside the write of checkpoint 4 and after step 7 (between checkpoints), resumed
    each time: the final prompt equals an uninterrupted run's.
    Each kill happens when the run has reached its point (SD4MATCH_TEST_HANG), never on a clock."""
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    assert subprocess.run(_train_cmd(tiny, willow_root, ref), capture_output=True).returncode == 0
    run = tmp_path / "killed"
    plan = ["ckpt:4", "step:7", None]  # the last attempt runs to the end
    for attempt, where in enumerate(plan):
        env = {**os.environ, **({"SD4MATCH_TEST_HANG": where} if where else {})}
        marker = run / ".test-hang"
        marker.unlink(missing_ok=True)
        p = subprocess.Popen(_train_cmd(tiny, willow_root, run, *(["--resume"] if attempt else [])), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if where is None:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()
            break
        while not marker.exists():
            assert p.poll() is None, f"the run ended before reaching {where}: {p.stderr.read().decode()}"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if where.startswith("ckpt"):
            assert list((run / "checkpoints").glob(".tmp-step-*")), "killed inside the write: a temporary folder is left"
    a, b = load_file(str(ref / "last/prompt.safetensors")), load_file(str(run / "last/prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # the last two are kept


def test_presets_and_overrides(tmp_path):
    assert set(PRESETS) == {f"{k}-{d}" for k in ("single", "category", "cpm") for d in ("spair", "pfpascal")}
    cfg = load_config("cpm-spair", root="/data")
    assert (cfg.prompt, cfg.dataset, cfg.timestep, cfg.up_block, cfg.ensemble, cfg.temperature, cfg.lr, cfg.lr_linear, cfg.batch_size, cfg.steps) == \
        ("cpm", "spair", 261, 1, 1, 0.04, 1e-2, 1e-3, 9, 30000)
    y = tmp_path / "s.yaml"
    y.write_text("steps: 50\nlr: 0.005\n")
    cfg = load_config("single-pfpascal", y, steps=20, root="/d")
    assert (cfg.steps, cfg.lr, cfg.dataset) == (20, 0.005, "pfpascal")
    y.write_text("stepz: 5\n")
    with pytest.raises(Sd4MatchError, match="unknown training setting 'stepz'"):
        load_config(None, y)
    with pytest.raises(Sd4MatchError, match="unknown preset"):
        load_config("cpm-willow")


def test_refuses_to_overwrite_a_run(tiny, willow_root, tmp_path, capsys):
    from sd4match.cli import main

    out = tmp_path / "run"
    args = _train_cmd(tiny, willow_root, out, "--steps", "2")[3:]  # the same command, in this process
    assert main(args) == 0
    before = (out / "last/prompt.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "last/prompt.safetensors").read_bytes() == before


@pytest.mark.long
def test_two_process_training_equals_one_process(tiny, willow_root, tmp_path):
    """torchrun, 2 CPU processes (gloo): each takes half of every step's micro-batches and the
    gradients are summed, so the run follows the 1-process run (up to the summation order)."""
    import json
    import socket

    from safetensors.torch import load_file

    from sd4match.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--steps", "3", "--batch-size", "4", "--val-every", "3", "--val-pairs", "6", "--ckpt-every", "3"]
    assert main(_train_cmd(tiny, willow_root, tmp_path / "one", *extra)[3:]) == 0  # one process: this one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = _train_cmd(tiny, willow_root, tmp_path / "two", *extra)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          *cmd[1:]], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one/last/prompt.safetensors"), load_file(tmp_path / "two/last/prompt.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    s1 = [json.loads(line) for line in (tmp_path / "one/scalars.jsonl").read_text().splitlines()]
    s2 = [json.loads(line) for line in (tmp_path / "two/scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in s2] == [1, 2, 3]  # one writer: the first process
    for r1, r2 in zip(s1, s2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
    assert [r["val_pck@0.1"] for r in s2 if "val_pck@0.1" in r] == pytest.approx([r["val_pck@0.1"] for r in s1 if "val_pck@0.1" in r], abs=0.02)
    assert json.loads((tmp_path / "two/config.json").read_text())["processes"] == 2


def test_bf16_autocast_training_step(tiny, willow_root, tmp_path):
    """Mixed precision: the frozen SD runs under bf16 autocast (CPU here, GPU in use); the
    prompt and Adam stay fp32, and the loss is close to the fp32 one."""
    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    losses = {}
    for dt in (None, "bf16"):
        cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=1, batch_size=2,
                          micro_batch=2, val_every=0, device="cpu", amp_dtype=dt)
        t = Trainer(cfg, tmp_path / str(dt), featurizer=feat, progress=False)
        before = t.prompt.tokens.detach().clone()
        losses[dt] = t.train_step()
        assert t.prompt.tokens.dtype == torch.float32 and not torch.equal(before, t.prompt.tokens.detach())
        assert not t.scaler.is_enabled()  # loss scaling is for fp16 on CUDA only
    assert losses["bf16"] == pytest.approx(losses[None], rel=0.02)


def test_kernel_settings_reach_training_and_keep_its_loss(tiny, willow_root, tmp_path):
    """``--channels-last``, ``--attention`` and ``--cudnn-benchmark`` reach the trainer's
    featurizer; a step through channels-last weights (backward included) gives the loss and
    the prompt update of the plain step, to float noise, and a resumed run may change them."""
    from sd4match.train import _resumable

    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    got = {}
    for name, kw in (("plain", {}), ("levers", {"channels_last": "on", "attention": "math", "cudnn_benchmark": "on"})):
        cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=1, batch_size=2,
                          micro_batch=2, val_every=0, device="cpu", **kw)
        t = Trainer(cfg, tmp_path / name, featurizer=feat, progress=False)
        assert (feat.config.channels_last, feat.config.attention, feat.config.cudnn_benchmark) == ((True, "math", True) if kw else (False, "auto", False))
        got[name] = (t.train_step(), t.prompt.tokens.detach().clone())
        t.close_loader()
        assert _resumable(dataclasses.asdict(cfg)) == _resumable(dataclasses.asdict(TrainConfig(**{**dataclasses.asdict(cfg), "channels_last": "off", "attention": "flash"})))
    assert feat.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert got["levers"][0] == pytest.approx(got["plain"][0], rel=1e-5)
    torch.testing.assert_close(got["levers"][1], got["plain"][1], rtol=1e-4, atol=1e-5)


def test_training_targets_are_clamped_as_the_official_datasets_do(tiny, willow_root, tmp_path):
    """Official dataset/spair.py:111-112: keypoints clamped to [1e-4, R - 1 - 1e-4] in the R x R
    frame before the loss. A target at x = W, y = 0 then has the same loss as the target put
    by hand at the clamped place (without the clamp its window centre falls on the grid's
    edge and is masked: another loss)."""
    import dataclasses

    import numpy as np

    from sd4match.train import clamp_to_frame

    W, H, R = 500, 332, 768
    got = clamp_to_frame([[500.0, 0.0], [250.0, 166.0]], (W, H), R)
    want = [[(R - 1 - 1e-4) * W / R, 1e-4 * H / R], [250.0, 166.0]]  # x' = 768 -> 767 - 1e-4; y' = 0 -> 1e-4
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)

    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="pfwillow", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=1, batch_size=1,
                      micro_batch=1, val_every=0, device="cpu", train_split="test", val_split="test")
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False)
    rec = t.train_pairs[0]
    (Wt, Ht), r = rec.trg_size, feat.resolution

    def loss_with(x, y):
        kps = rec.trg_kps.copy()
        kps[0] = (x, y)
        with torch.no_grad():
            return t.micro_loss([dataclasses.replace(rec, trg_kps=kps)], torch.Generator().manual_seed(0)).item()

    border = loss_with(Wt, 0.0)
    by_hand = loss_with((r - 1 - 1e-4) * Wt / r, 1e-4 * Ht / r)
    inside = loss_with((r - 1.5) * Wt / r, 1.5 * Ht / r)
    assert border == pytest.approx(by_hand, rel=1e-6)
    assert abs(border - inside) > 1e-3  # the case is not degenerate: the target's place changes the loss


@pytest.mark.parametrize("kind", ["hidden", "hidden-category"])
def test_hidden_state_prompts_train(kind, tiny, willow_root, tmp_path):
    """--prompt hidden / hidden-category (the official --learn_hidden_state): three steps change
    the learned CLIP-output rows, and the saved prompt gives them back unchanged."""
    from sd4match.prompts import load_prompt

    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt=kind, model=str(tiny), resolution=64, steps=3, batch_size=2,
                      micro_batch=2, val_every=0, ckpt_every=1000, device="cpu")
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False)
    before = t.prompt.states.detach().clone()
    out = t.run()
    assert not torch.equal(before, t.prompt.states.detach())
    p = load_prompt(out / "last", feat)
    assert p.kind == kind and torch.equal(p.states, t.prompt.states.detach().cpu())


@pytest.mark.parametrize("kind,cpm_input,n_global", [("cpm-image", "patches", 25), ("cpm", "cls", 0)])
def test_cpm_variants_train(kind, cpm_input, n_global, tiny, willow_root, tmp_path):
    """The official Img mode (each picture's own prompt) and a Pair-Head G0 CPM train through the
    same loop: three steps change every learned tensor, and the folder records the variant."""
    import typing

    from sd4match.config import CpmInput
    from sd4match.prompts import load_prompt
    from sd4match.prompts.cpm import CPM_INPUTS

    assert typing.get_args(CpmInput) == CPM_INPUTS
    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    dino = DinoFeaturizer.from_pretrained(tiny_dinov2(tmp_path / "dino"))
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt=kind, model=str(tiny), resolution=64, steps=3, batch_size=2,
                      micro_batch=2, val_every=0, ckpt_every=1000, device="cpu", cpm_input=cpm_input, global_tokens=n_global, cond_tokens=30)
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, dino=dino, progress=False)
    before = {k: v.detach().clone() for k, v in t.prompt.state_dict().items()}
    out = t.run()
    after = t.prompt.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), [k for k in before if torch.equal(before[k], after[k])]
    p = load_prompt(out / "last", feat)
    assert (p.kind, p.config.cpm_input, p.config.n_global, p.config.n_cond) == (kind, cpm_input, n_global, 30)
    assert ("global_embeds" in after) == bool(n_global)


def test_excluded_categories_are_never_drawn_and_scores_split_seen_from_unseen(tiny, spair_with_images, tmp_path, capsys):
    """train --exclude-categories on the SPair-71k fixture: no excluded pair over a whole epoch;
    the prompt records what it saw; evaluate's score.json gives the means over seen and unseen
    categories, equal to the means of its per-category numbers."""
    import json

    import numpy as np

    from sd4match.cli import main

    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="spair", root=str(spair_with_images), prompt="single", model=str(tiny), resolution=64, steps=2, batch_size=1,
                      micro_batch=1, val_every=0, ckpt_every=1000, device="cpu", exclude_categories=("car",))
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False)
    jobs = t._micro_jobs(0)
    drawn = [r.category for _ in range(3 * len(t.train_pairs)) for r in next(jobs)[2]]  # three epochs of micro-batches
    assert drawn and set(drawn) == {"aeroplane"}
    out = t.run()
    assert json.loads((out / "last" / "config.json").read_text())["training"]["categories"] == ["aeroplane"]
    with pytest.raises(Sd4MatchError, match="category 'tiger' is not in spair trn; its categories: aeroplane, car"):
        Trainer(TrainConfig(**{**cfg.__dict__, "categories": ("tiger",)}), tmp_path / "r2", featurizer=feat, progress=False)

    ev = tmp_path / "eval"
    assert main(["evaluate", "--dataset", "spair", "--root", str(spair_with_images), "--split", "test", "--prompt", str(out / "last"),
                 "--model", str(tiny), "--resolution", "64", "--ensemble", "1", "--device", "cpu", "--no-progress", "--out", str(ev)]) == 0
    doc = json.loads((ev / "score.json").read_text())
    su = doc["seen_unseen"]
    assert su["seen"] == ["aeroplane"] and sorted(su["unseen"]) == ["bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair"]
    for agg in ("per_image", "per_point"):
        by = doc[agg]["by_category"]
        for a in ("0.05", "0.1", "0.15"):
            assert su[agg]["seen"][a] == pytest.approx(by["aeroplane"][a])
            assert su[agg]["unseen"][a] == pytest.approx(np.mean([by[c][a] for c in su["unseen"]]))
    assert "mean of unseen categories (8)" in capsys.readouterr().out
    assert main(["score", "--dataset", "spair", "--root", str(spair_with_images), "--split", "test", "--predictions", str(ev / "predictions.jsonl"),
                 "--protocol", "sd4match", "--seen", str(out / "last"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seen_unseen"] == su


def test_validation_on_part_of_the_split_covers_every_category_and_is_recorded(tiny, willow_root, tmp_path):
    """--val-pairs N validates on each category's share of N (as evaluate --limit; the first
    N pairs of a category-sorted split were one category, so the best prompt was chosen on
    it alone). The rule is recorded: a checkpoint of an earlier version, which took the
    first N, is not resumed, and the line says why."""
    import json

    from sd4match.data import open_dataset
    from sd4match.data.records import limit_pairs

    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=1, batch_size=2,
                      micro_batch=2, val_every=0, ckpt_every=1, device="cpu", val_split="test", val_pairs=5)
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False)
    split = open_dataset("synthetic", willow_root).pairs("test")
    cats = list(dict.fromkeys(r.category for r in split))
    assert len(cats) >= 2 and len({r.category for r in split[:5]}) < len(cats)  # the first 5 would not cover them
    assert [r.id for r in t.val_pairs] == [r.id for r in limit_pairs(split, 5)]
    assert {r.category for r in t.val_pairs} == set(cats[:5])
    t.run()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["val_pairs_rule"] == "category-share"
    state = next((tmp_path / "run" / "checkpoints").iterdir()) / "state.json"
    doc = json.loads(state.read_text())
    del doc["config"]["val_pairs_rule"]  # as an earlier sd4match wrote it
    state.write_text(json.dumps(doc))
    with pytest.raises(Sd4MatchError, match=r"other settings \(val_pairs_rule: an earlier sd4match's --val-pairs took the first N pairs, "
                                            r"this one takes each category's share\)"):
        Trainer(dataclasses.replace(cfg, steps=2), tmp_path / "run", featurizer=feat, progress=False).run(resume=True)


@pytest.mark.parametrize("stop_at", [2, 4])
def test_a_stop_during_validation_keeps_the_step_and_resumes_exactly(stop_at, tiny, willow_root, tmp_path, monkeypatch):
    """SIGTERM while a validation runs (a scheduler's grace period may be shorter than one) was
    acted on after it: a job killed there lost every step since the last checkpoint. Now the
    validation stops, the step is checkpointed with its log line pending, and the resumed run
    validates that step first: its log, best/ and last/ equal a run never stopped's; an
    extended run logs no step twice. At the last step too (which never stopped before)."""
    import json

    import sd4match.train as train_mod
    from safetensors.torch import load_file

    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=4, batch_size=2,
                      micro_batch=2, val_every=2, val_ensemble=1, ckpt_every=100, device="cpu", val_split="test", val_pairs=3, workers=0)

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k != "pairs_per_s"} for line in (run / "scalars.jsonl").read_text().splitlines()]

    Trainer(cfg, tmp_path / "clean", featurizer=feat, progress=False).run()
    real, validations = train_mod.predict_pairs, []

    def sigterm_inside(*a, **k):
        validations.append(1)
        for i, got in enumerate(real(*a, **k)):
            if len(validations) == stop_at // 2 and i == 0:
                signal.raise_signal(signal.SIGTERM)
            yield got

    monkeypatch.setattr(train_mod, "predict_pairs", sigterm_inside)
    run = tmp_path / "stopped"
    with pytest.raises(train_mod.RunStopped, match=rf"SIGTERM at step {stop_at} of 4 \(its validation was cut short: it runs first when resumed\)"):
        Trainer(cfg, run, featurizer=feat, progress=False).run()
    assert [c.name for c in (run / "checkpoints").iterdir()] == [f"step-{stop_at:07d}"] and (run / "last" / "prompt.safetensors").is_file()
    assert [r["step"] for r in log(run)] == list(range(1, stop_at))  # the step's line waits for its validation
    assert (run / "curves.png").is_file() and (tmp_path / "clean" / "curves.png").is_file()  # drawn at a stop and at the end
    monkeypatch.setattr(train_mod, "predict_pairs", real)
    Trainer(cfg, run, featurizer=feat, progress=False).run(resume=True)
    assert log(run) == log(tmp_path / "clean")
    for folder in ("best", "last"):
        a, b = load_file(str(tmp_path / "clean" / folder / "prompt.safetensors")), load_file(str(run / folder / "prompt.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    Trainer(dataclasses.replace(cfg, steps=6), run, featurizer=feat, progress=False).run(resume=True)
    assert [r["step"] for r in log(run)] == [1, 2, 3, 4, 5, 6]


def test_a_category_that_is_not_there_is_named_before_any_model_loads(tiny, willow_root, tmp_path, monkeypatch):
    """--categories naming no category of the split, or --exclude-categories leaving none, is
    one line before Stable Diffusion loads (the data was read after the models)."""
    import sd4match.train

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sd4match.train, "load_featurizer", no_load)
    base = dict(dataset="synthetic", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=1, batch_size=1, micro_batch=1,
                device="cpu")
    with pytest.raises(Sd4MatchError, match=r"category 'horse' is not in synthetic trn; its categories: PF-dataset/car\(G\)"):
        Trainer(TrainConfig(**base, categories=("horse",)), tmp_path / "a", progress=False)
    with pytest.raises(Sd4MatchError, match=r"no training pairs with keypoints in split 'trn' after --categories / --exclude-categories$"):
        Trainer(TrainConfig(**base, categories=("PF-dataset/car(G)",), exclude_categories=("PF-dataset/car(G)",)), tmp_path / "b", progress=False)


def test_settings_a_run_never_reads_are_named():
    """--lora-rank without --adapt lora, CPM settings for a single prompt, --fixed-prompt when
    the prompt is trained, the prompt's kind and lr when only an adapter is: each named
    (the command warns with them), as the presets' own values never are."""
    from sd4match.config import TRAIN_PRESETS, load_train_config
    from sd4match.train import unused_settings

    def unused(**kw):
        return unused_settings(TrainConfig(dataset="pfwillow", root="x", **kw))

    assert unused() == [] and unused(prompt="cpm", cpm_input="cls", global_tokens=0, lr_linear=0.1, dino="dinov2-s") == []
    assert unused(lora_rank=8, finetune_blocks=("up_blocks.1",), lr_adapter=1e-3) == ["--lora-rank", "--finetune-blocks", "--lr-adapter"]
    assert unused(prompt="single", cpm_input="cls", global_tokens=0, lr_linear=0.1) == ["--lr-linear", "--cpm-input", "--global-tokens"]
    assert unused(fixed_prompt="text") == ["--fixed-prompt"]
    assert unused(adapt="lora", prompt="cpm", lr=0.5, lora_rank=8, fixed_prompt="text") == ["--prompt", "--lr"]
    assert unused(adapt="prompt+finetune", finetune_blocks=("up_blocks.1",), lr_adapter=1e-5, lora_alpha=2.0) == ["--lora-alpha"]
    assert all(unused_settings(load_train_config(p, root="x")) == [] for p in TRAIN_PRESETS)


def test_a_curves_picture_that_cannot_be_drawn_never_stops_the_run(tiny, willow_root, tmp_path, monkeypatch):
    """curves.png is drawn inside the run (at a stop, at the end): a failure there (a full
    disk) is a warning, and the run's prompts and log are all written."""
    import sd4match.train as train_mod
    from sd4match.errors import Sd4MatchWarning

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod, "plot_training", full_disk)
    feat = SDFeaturizer.from_pretrained(tiny, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(tiny), resolution=64, steps=2, batch_size=2,
                      micro_batch=2, val_every=1, val_ensemble=1, ckpt_every=100, device="cpu", val_split="test", val_pairs=2, workers=0)
    with pytest.warns(Sd4MatchWarning, match=r"curves\.png: not drawn \(\[Errno 28\] No space left on device\); the run goes on"):
        out = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False).run()
    assert (out / "best" / "prompt.safetensors").is_file() and (out / "last" / "prompt.safetensors").is_file()
    assert len((out / "scalars.jsonl").read_text().splitlines()) == 2 and not (out / "curves.png").exists()
