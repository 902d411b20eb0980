"""Adaptation beyond prompts: LoRA adapters and fine-tuning of the UNet (tiny random SD, real
PF-Willow pictures)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer
from sd4match.features.adapters import DEFAULT_TARGETS, Adapter, AdapterConfig, load_adapter
from sd4match.testing import tiny_sd
from sd4match.train import Trainer, TrainConfig


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("m") / "sd2")


def pictures():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)), Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))]


def maps(feat):
    with torch.no_grad():
        return feat(pictures(), generator=torch.Generator().manual_seed(0))


def test_lora_at_zero_equals_the_base_and_leaves_a_shared_unet_alone(sd_path, tmp_path):
    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
    other = SDFeaturizer(feat.unet, feat.vae, feat.text_encoder, feat.tokenizer, feat.scheduler, feat.config, model_id=feat.model_id)  # one UNet, two featurizers
    base = maps(feat)
    before = {k: v.clone() for k, v in feat.unet.state_dict().items()}
    ad = Adapter(feat.unet, AdapterConfig("lora", up_block=1, rank=2))
    feat.use_adapter(ad)
    assert torch.equal(maps(feat), base)  # B = 0 at initialisation: the base model's features, bit for bit
    with torch.no_grad():
        for b in ad.lora_B:
            b.normal_(0, 0.2)
    adapted = maps(feat)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(maps(other), base)  # the other featurizer over the same UNet: no adapter active
    assert all(torch.equal(v, before[k]) for k, v in feat.unet.state_dict().items())  # the UNet itself never changed
    assert feat.settings()["adapter"] != "x" and "adapter" not in other.settings()
    # only blocks the early exit runs are adapted, and only the named projections
    assert ad.names and all(n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for n in ad.names)
    assert not any(n.startswith(("up_blocks.2", "up_blocks.3")) for n in ad.names)
    assert all(n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for n in ad.names)
    ad.save(tmp_path / "a")
    again = load_adapter(tmp_path / "a", feat.unet)
    feat.use_adapter(again)
    assert torch.equal(maps(feat), adapted)  # save -> load -> identical features
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"cut")
    with pytest.raises(Sd4MatchError, match="cannot read adapter weights"):
        load_adapter(tmp_path / "a", feat.unet)
    assert TrainConfig(root="r").lora_targets == DEFAULT_TARGETS  # the flag's default is the adapter's
    with pytest.raises(Sd4MatchError, match="no linear layer"):
        Adapter(feat.unet, AdapterConfig("lora", up_block=1, targets=["nope"]))
    with pytest.raises(Sd4MatchError, match="not among the blocks the early exit runs"):
        Adapter(feat.unet, AdapterConfig("finetune", up_block=0, blocks=["up_blocks.2"]))


@pytest.mark.parametrize("adapt", ["lora", "prompt+lora", "finetune"])
def test_adapters_train_and_only_their_tensors_get_gradients(adapt, sd_path, willow_root, tmp_path, capsys):
    """A few steps on warps of the fixture photos: the loss falls, only adapter (and prompt)
    tensors get gradients, the run folder holds the adapter and what it cost, and evaluate
    reads the folder back with the same features."""
    from sd4match.cli import main

    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(sd_path), resolution=64, steps=30, batch_size=2,
                      micro_batch=2, val_every=0, ckpt_every=1000, device="cpu", adapt=adapt, lora_rank=4,
                      lr_adapter=3e-3 if adapt != "finetune" else 1e-3, finetune_blocks=("up_blocks.1",) if adapt == "finetune" else ())
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False)
    unet_before = {k: v.clone() for k, v in feat.unet.state_dict().items()}
    losses = [t.train_step() for _ in range(cfg.steps)]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"{adapt}: loss {first:.3f} -> {last:.3f}, trainable {t.cost['trainable_params']}")
    assert last < first
    assert all(p.grad is None for p in feat.unet.parameters())  # the UNet's own weights are never trained
    adapted = maps(feat)
    feat.use_adapter(None)
    assert (adapted - maps(feat)).abs().max() > 1e-4  # the trained adapter changes the features
    feat.use_adapter(t.adapter)
    assert all(torch.equal(v, unet_before[k]) for k, v in feat.unet.state_dict().items())
    prompt_grads = [p.grad is not None for p in t.prompt.parameters()]
    assert any(prompt_grads) == adapt.startswith("prompt")
    assert all(p.grad is not None for p in t.adapter.parameters())
    t.step = cfg.steps
    out = t.run()
    doc = json.loads((out / "config.json").read_text())
    assert doc["cost"]["trainable_params"] == t.adapter.trainable_count() + (sum(p.numel() for p in t.prompt.parameters()) if adapt.startswith("prompt") else 0)
    assert doc["cost"]["peak_memory_mb"] > 0 and "seconds_per_step" in doc["cost"]
    assert (out / "last" / "adapter.safetensors").is_file() and (out / "last" / "adapter.json").is_file()
    want = maps(feat)  # the trained adapter on the trainer's featurizer (prompt aside: maps() uses the empty text)
    fresh = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
    from sd4match.prompts import resolve_prompt

    resolve_prompt(str(out / "last"), fresh)
    assert fresh.adapter is not None and torch.equal(maps(fresh), want)
    ev = tmp_path / "ev"
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--prompt", str(out / "last"), "--model",
                 str(sd_path), "--resolution", "64", "--ensemble", "1", "--limit", "4", "--device", "cpu", "--no-progress", "--out", str(ev)]) == 0
    score = json.loads((ev / "score.json").read_text())
    assert score["run"]["config"]["settings"]["adapter"].startswith(adapt.split("+")[-1])
    assert score["run"]["training_cost"]["trainable_params"] == doc["cost"]["trainable_params"]
    capsys.readouterr()


def test_lora_resume_is_bit_exact(sd_path, willow_root, tmp_path):
    """Stopped at step 4 (a checkpoint), resumed to 8: the adapter's tensors equal an
    uninterrupted run's."""
    from safetensors.torch import load_file

    def cfg(steps):
        return TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(sd_path), resolution=64, steps=steps,
                           batch_size=2, micro_batch=1, val_every=0, ckpt_every=4, device="cpu", adapt="prompt+lora", lr_adapter=3e-3)

    ref = Trainer(cfg(8), tmp_path / "ref", featurizer=SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1), progress=False).run()
    Trainer(cfg(4), tmp_path / "cut", featurizer=SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1), progress=False).run()
    Trainer(cfg(8), tmp_path / "cut", featurizer=SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1), progress=False).run(resume=True)
    for f in ("adapter.safetensors", "prompt.safetensors"):
        a, b = load_file(str(ref / "last" / f)), load_file(str(tmp_path / "cut" / "last" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_compare_three_runs_gives_their_own_numbers(sd_path, willow_root, tmp_path, capsys):
    """Three tiny runs (prompt, LoRA, both), each evaluated: `compare`'s table holds the numbers
    of each run's score.json and its training cost, time and memory included (best/ is
    written when validated, before the run's time is known)."""
    import csv

    from sd4match.cli import main

    evals = []
    for adapt in ("prompt", "lora", "prompt+lora"):
        feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
        cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model=str(sd_path), resolution=64, steps=2, batch_size=2,
                          micro_batch=2, val_every=2, val_pairs=2, ckpt_every=1000, device="cpu", adapt=adapt)
        out = Trainer(cfg, tmp_path / adapt, featurizer=feat, progress=False).run()
        ev = tmp_path / f"ev-{adapt.replace('+', '-')}"
        assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--prompt", str(out / "best"), "--model",
                     str(sd_path), "--resolution", "64", "--ensemble", "1", "--limit", "6", "--device", "cpu", "--no-progress", "--out", str(ev)]) == 0
        evals.append(ev)
    capsys.readouterr()
    assert main(["compare", *map(str, evals), "--out", str(tmp_path / "cmp")]) == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["run"] for r in rows] == [e.name for e in evals]
    for r, ev in zip(rows, evals):
        doc = json.loads((ev / "score.json").read_text())
        assert float(r["per image @0.1"]) == pytest.approx(100 * doc["per_image"]["all"]["0.1"], abs=0.006)
        assert float(r["per point @0.05"]) == pytest.approx(100 * doc["per_point"]["all"]["0.05"], abs=0.006)
        assert int(r["trainable params"]) == doc["run"]["training_cost"]["trainable_params"] and r["adapt"] == doc["run"]["training_cost"]["adapt"]
        assert float(r["s/step"]) > 0 and float(r["peak MB"]) > 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5_000 and "| run | prompt | adapt |" in capsys.readouterr().out


@pytest.mark.parametrize("kind,extra", [("cpm", {"cpm_input": "cls"}), ("cpm-image", {}),  # the others in the long run (CI runs it)
                                        *(pytest.param("cpm", e, marks=pytest.mark.long) for e in ({"cpm_input": "mean"}, {"global_tokens": 0},
                                                                                               {"cpm_plain": True}))])
def test_conditioning_variants_learn(kind, extra, sd_path, willow_root, tmp_path):
    """Each conditioning variant trains on warps of the fixture photos with a falling loss."""
    from sd4match.features import DinoFeaturizer
    from sd4match.testing import tiny_dinov2

    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
    dino = DinoFeaturizer.from_pretrained(tiny_dinov2(tmp_path / "dino"))
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt=kind, model=str(sd_path), resolution=64, steps=20, batch_size=2,
                      micro_batch=2, val_every=0, ckpt_every=1000, device="cpu", lr_linear=1e-2, **extra)
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, dino=dino, progress=False)
    losses = [t.train_step() for _ in range(cfg.steps)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_compare_names_what_is_not_an_evaluation_and_writes_nothing(tmp_path, capsys):
    from sd4match.cli import main

    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "predictions.partial.jsonl").write_text("")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "score.json").write_text('{"protocol": "sd4m')
    out = tmp_path / "cmp"
    cases = {"unfinished": "holds no score.json (not a finished evaluation", "gone": "no such folder", "cut": "score.json: not the score.json of an evaluation"}
    for name, words in cases.items():
        assert main(["compare", str(tmp_path / name), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sd4match: error: {tmp_path / name}") and words in err and "\n" not in err
    assert not out.exists()


def _score_doc(pck: float, n_pairs: int = 450, limit: int = 0, alphas=("0.05", "0.1", "0.15"), prompt: str = "p") -> str:
    by = {a: pck for a in alphas}
    return json.dumps({"dataset": "pfwillow", "split": "test", "protocol": "sd4match", "n_pairs": n_pairs, "per_image": {"all": by},
                       "per_point": {"all": by}, "run": {"config": {"prompt": prompt, "limit": limit, **({"limit_pairs": "category-share"} if limit else {})}}})


def test_compare_counts_a_zero_shot_run_as_nothing_learned(tmp_path, capsys):
    """An evaluation with the empty or a text prompt learned nothing: 0 parameters (before:
    '-' in the table and '? params' in the picture, as for a run whose cost is unknown)."""
    import csv

    from sd4match.cli import main

    for name, prompt in (("empty", "empty"), ("text", "text:a photo of a {category}"), ("old", "runs/old/best")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "score.json").write_text(_score_doc(0.5, prompt=prompt))
    assert main(["compare", *(str(tmp_path / n) for n in ("empty", "text", "old")), "--out", str(tmp_path / "cmp")]) == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [(r["adapt"], r["trainable params"]) for r in rows] == [("none (zero-shot)", "0"), ("none (zero-shot)", "0"), ("-", "-")]


def test_compare_names_runs_apart_and_refuses_different_pairs(tmp_path, capsys):
    """runs/x/test and runs/y/test are named x/test and y/test (before: 'test' twice, as the
    README's own compare examples make them); a --limit run beside a full one is refused,
    naming each run's pairs (before: side by side as if comparable); only the thresholds
    every run has are compared."""
    import csv

    from sd4match.cli import main

    for name, doc in {"prompt/test": _score_doc(0.5), "lora/test": _score_doc(0.6), "solo": _score_doc(0.7, alphas=("0.1",)),
                      "quick/test": _score_doc(0.9, n_pairs=20, limit=20)}.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "score.json").write_text(doc)
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "prompt" / "test"), str(tmp_path / "lora" / "test"), str(tmp_path / "solo"), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["run"] for r in rows] == ["prompt/test", "lora/test", "solo"]
    assert [r["per image @0.1"] for r in rows] == ["50.00", "60.00", "70.00"] and "per image @0.05" not in rows[0]
    assert capsys.readouterr().out.startswith("# Comparison: pfwillow/test, protocol sd4match, 450 pairs (PCK in %)")
    assert main(["compare", str(tmp_path / "prompt" / "test"), str(tmp_path / "quick" / "test"), "--out", str(tmp_path / "cmp2")]) == 2
    assert capsys.readouterr().err.strip() == ("sd4match: error: the runs were scored on different pairs: prompt/test: 450 pairs; "
                                               "quick/test: 20 pairs (--limit 20); compare evaluations of the same pairs")
    assert not (tmp_path / "cmp2").exists()


def test_compare_with_the_root_gives_bootstrap_intervals_and_paired_differences(willow_root, tmp_path, capsys):
    """With --root, each run's predictions are scored again pair by pair: the intervals are
    a bootstrap over the pairs (2,000 resamples, seed 0) computed by hand below from the
    per-pair PCK (PF-Willow's base: the target keypoints' extent in the 768 frame), the
    differences paired on the same resamples; a run beside itself differs by exactly 0. A
    root of other pairs, whose scores would not be the run's, is refused."""
    import csv

    import numpy as np

    from sd4match.cli import main
    from sd4match.data import open_dataset
    from sd4match.data.records import limit_pairs
    from sd4match.metrics import load_predictions

    common = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", "effnet-lite0", "--limit", "30",
              "--match", "nn", "--device", "cpu", "--no-progress"]
    for name, res in (("small", "128"), ("large", "192")):
        assert main([*common, "--resolution", res, "--out", str(tmp_path / name)]) == 0
    runs = [str(tmp_path / "small"), str(tmp_path / "large")]
    assert main(["compare", *runs, "--root", str(willow_root), "--out", str(tmp_path / "cmp")]) == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    # by hand: PCK@0.1 of each pair in the sd4match frame, then the bootstrap
    recs = limit_pairs(open_dataset("pfwillow", willow_root).pairs("test"), 30)
    v = []
    for name in ("small", "large"):
        preds = load_predictions(tmp_path / name / "predictions.jsonl")
        per = []
        for r in recs:
            s = np.array([768 / r.trg_size[0], 768 / r.trg_size[1]])
            gt = np.clip(r.trg_kps * s, 1e-4, 767 - 1e-4)
            ext = (r.trg_kps * s).max(axis=0) - (r.trg_kps * s).min(axis=0)
            per.append(np.mean(np.linalg.norm(preds[r.id] * s - gt, axis=1) <= 0.1 * ext.max()))
        v.append(per)
    v = np.array(v)
    rng = np.random.default_rng(0)
    means = np.concatenate([v[:, rng.integers(0, 30, size=(100, 30))].mean(axis=2) for _ in range(20)], axis=1)
    ci = [np.percentile(m, [2.5, 97.5]) for m in means]
    d = np.percentile(means[1] - means[0], [2.5, 97.5])
    assert [r["per image @0.1"] for r in rows] == [f"{100 * x:.2f}" for x in v.mean(axis=1)]
    assert [r["per image @0.1 95% CI"] for r in rows] == [f"[{100 * lo:.2f}, {100 * hi:.2f}]" for lo, hi in ci]
    assert rows[0]["difference from small @0.1 (95% CI)"] == "(reference)"
    assert rows[1]["difference from small @0.1 (95% CI)"] == f"{100 * (v[1].mean() - v[0].mean()):+.2f} [{100 * d[0]:+.2f}, {100 * d[1]:+.2f}]"
    assert ci[0][0] < ci[0][1] and "paired for the differences" in (tmp_path / "cmp" / "compare.md").read_text()
    # the same predictions under another name: no difference at all
    import shutil

    shutil.copytree(tmp_path / "small", tmp_path / "again")
    assert main(["compare", runs[0], str(tmp_path / "again"), "--root", str(willow_root)]) == 0
    assert "| +0.00 [+0.00, +0.00] |" in capsys.readouterr().out
    # a root whose pairs are not the run's: its scores would not be the run's
    other = tmp_path / "other"
    other.mkdir()
    (other / "PF-dataset").symlink_to(willow_root / "PF-dataset", target_is_directory=True)
    (other / "test_pairs.csv").write_text("\n".join((willow_root / "test_pairs.csv").read_text().splitlines()[:1]
                                                   + (willow_root / "test_pairs.csv").read_text().splitlines()[200:]) + "\n")
    assert main(["compare", *runs, "--root", str(other)]) == 2
    assert capsys.readouterr().err.strip().endswith("give --root the dataset the run was evaluated on (or predictions.jsonl was changed)")
    (other / "test_pairs.csv").write_text((willow_root / "test_pairs.csv").read_text())
    (tmp_path / "small" / "predictions.jsonl").write_text((tmp_path / "large" / "predictions.jsonl").read_text())  # another run's predictions
    assert main(["compare", *runs, "--root", str(other)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sd4match: error: {tmp_path / 'small' / 'predictions.jsonl'}: scored on {other} it gives PCK@0.1 {rows[1]['per image @0.1']}, its score.json "
        f"{rows[0]['per image @0.1']}: give --root the dataset the run was evaluated on (or predictions.jsonl was changed)")
    assert main(["compare", runs[0], runs[1], runs[0] + "/"]) == 2
    assert capsys.readouterr().err.strip() == f"sd4match: error: {runs[0]}: given twice (as {runs[0]}); name each evaluation once"


def test_compare_scores_an_earlier_limited_run_on_its_own_first_pairs(willow_root, tmp_path, capsys):
    """An earlier sd4match's `--limit N` took the split's first N pairs (its score.json names
    no rule): compare --root scores it on those, not on each category's share."""
    import json

    from sd4match.cli import main
    from sd4match.config import EvalConfig
    from sd4match.data import open_dataset
    from sd4match.evaluate import evaluate
    from sd4match.features import load_featurizer

    feat = load_featurizer("effnet-lite0", resolution=128)
    first = open_dataset("pfwillow", willow_root).pairs("test")[:12]
    for name in ("a", "b"):
        evaluate(feat, EvalConfig("pfwillow", str(willow_root), rule="nn", limit=12, seed=0), tmp_path / name, records=first, progress=False)
        doc = json.loads((tmp_path / name / "score.json").read_text())
        del doc["run"]["config"]["limit_pairs"]  # as an earlier sd4match wrote it
        (tmp_path / name / "score.json").write_text(json.dumps(doc))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--root", str(willow_root)]) == 0
    assert "| +0.00 [+0.00, +0.00] |" in capsys.readouterr().out


def test_compare_adds_the_geometry_aware_subset_when_every_run_has_it(tmp_path):
    """SPair-71k's and AP-10K's evaluations score the geometry-aware points apart
    (``geo_aware``); compare puts them beside the rest, when every run has them."""
    import csv

    from sd4match.cli import main

    def doc(pck, geo=None):
        d = json.loads(_score_doc(pck))
        if geo is not None:
            for agg in ("per_image", "per_point"):
                d[agg]["geo_aware"] = {"all": {"0.05": geo / 2, "0.1": geo, "0.15": geo}, "by_category": {}}
            d["per_point"]["geo_aware"]["all"]["0.1"] = geo - 0.05
            d["per_point"]["geo_aware"]["twin_swaps"] = {"0.05": 0.0, "0.1": geo / 4, "0.15": 0.0}
        return json.dumps(d)

    for name, text in (("a", doc(0.5, 0.4)), ("b", doc(0.6, 0.3)), ("old", doc(0.7))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "score.json").write_text(text)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [(r["geo-aware per image @0.1"], r["geo-aware per point @0.1"], r["geo-aware on a twin @0.1"]) for r in rows] == [
        ("40.00", "35.00", "10.00"), ("30.00", "25.00", "7.50")]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "old"), "--out", str(tmp_path / "cmp2")]) == 0  # not every run has them
    assert not any(k.startswith("geo-aware") for k in next(csv.DictReader((tmp_path / "cmp2" / "compare.csv").open())))


def test_compare_prints_the_papers_per_category_table_in_markdown_and_latex(tmp_path, capsys):
    """Runs as rows, categories then their mean and all pairs as columns, PCK@0.1 per image
    and per point; the best of each column in bold, as printed (50.12 beats 50.08 at two
    decimals, both are 50.1 at LaTeX's one); LaTeX's special characters escaped; a category
    a run lacks is '-'; a score.json that names no prompt (`score --out`) shows '-'."""
    from sd4match.cli import main

    def doc(cats, mean, every, point_all):
        d = json.loads(_score_doc(every))
        d.pop("run")
        for agg, all_ in (("per_image", every), ("per_point", point_all)):
            d[agg] = {"all": {"0.05": 0.0, "0.1": all_, "0.15": 1.0}, "category_mean": {"0.05": 0.0, "0.1": mean, "0.15": 1.0},
                      "by_category": {c: {"0.05": 0.0, "0.1": v, "0.15": 1.0} for c, v in cats.items()}}
        return json.dumps(d)

    (tmp_path / "x_1").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "x_1" / "score.json").write_text(doc({"cat_x": 0.5012, "a&b": 0.70}, 0.6006, 0.61, 0.40))
    (tmp_path / "b" / "score.json").write_text(doc({"cat_x": 0.5008}, 0.6104, 0.60, 0.45))
    assert main(["compare", str(tmp_path / "x_1"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| x_1 | - | - |" in md  # no prompt recorded: '-', not 'None'
    assert ("## PCK@0.1 per image by category (%; the best of each column in bold)\n\n"
            "| run | cat_x | a&b | mean of categories | all |\n|---|---|---|---|---|\n"
            "| x_1 | **50.12** | **70.00** | 60.06 | **61.00** |\n"
            "| b | 50.08 | - | **61.04** | 60.00 |\n") in md
    assert "| x_1 | **50.12** | **70.00** | 60.06 | 40.00 |\n| b | 50.08 | - | **61.04** | **45.00** |\n" in md.split("per point by category")[1]
    tex = (tmp_path / "cmp" / "compare.tex").read_text()
    assert tex.startswith("% sd4match compare: pfwillow/test, protocol sd4match, 450 pairs; PCK@0.1 per image by category (%), "
                          "the best of each column in bold\n"
                          "\\begin{tabular}{lcccc}\n\\toprule\n"
                          "Run & cat\\_x & a\\&b & Mean & All \\\\\n\\midrule\n"
                          "x\\_1 & \\textbf{50.1} & \\textbf{70.0} & 60.1 & \\textbf{61.0} \\\\\n"
                          "b & \\textbf{50.1} & - & \\textbf{61.0} & 60.0 \\\\\n"
                          "\\bottomrule\n\\end{tabular}\n")
    assert tex.count("\\begin{tabular}") == 2 and "PCK@0.1 per point by category" in tex


def test_a_failed_compare_leaves_its_output_folder_as_it_was(tmp_path, monkeypatch):
    """compare's four files are written together: a plot that fails leaves an earlier
    comparison's files byte for byte (before: compare.md and .csv were already replaced)."""
    from sd4match import compare as compare_module
    from sd4match.cli import main

    for name, pck in (("a", 0.5), ("b", 0.6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "score.json").write_text(_score_doc(pck))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert {"compare.md", "compare.csv", "compare.tex", "compare.png"} <= set(before)
    (tmp_path / "b" / "score.json").write_text(_score_doc(0.9))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(compare_module, "plot_compare", broken)
    with pytest.raises(OSError):
        main(["--debug", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert not [f for f in tmp_path.iterdir() if "staging" in f.name]
