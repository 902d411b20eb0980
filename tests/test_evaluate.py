"""`sd4match evaluate` end to end on the real PF-Willow fixture with a tiny random SD."""

import json

import pytest

from sd4match.cli import main
from sd4match.testing import tiny_sd


def test_evaluate_then_score_agree(tmp_path, willow_root, capsys):
    model = tiny_sd(tmp_path / "tiny")
    out = tmp_path / "eval"
    args = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", str(model),
            "--resolution", "64", "--ensemble", "1", "--prompt", "text", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("PCK on pfwillow/test | protocol: sd4match | 450 pairs, 4500 points")
    ev = json.loads((out / "score.json").read_text())
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 450 and all(len(p["kps"]) == 10 for p in preds)
    assert ev["run"]["config"]["prompt"] == "text" and ev["run"]["config"]["settings"]["model"] == str(model.resolve())
    assert main(["score", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--predictions", str(out / "predictions.jsonl"),
                 "--protocol", "sd4match", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    del ev["run"]
    assert scored == ev


def test_evaluate_rejects_prompt_for_effnet(tmp_path, willow_root):
    from sd4match.errors import Sd4MatchError
    from sd4match.evaluate import EvalConfig, evaluate
    from sd4match.features import load_featurizer

    with pytest.raises(Sd4MatchError, match="takes no prompt"):
        evaluate(load_featurizer("effnet-lite0"), EvalConfig("pfwillow", str(willow_root), prompt="text"), tmp_path / "o")


@pytest.mark.long
def test_two_processes_write_the_same_predictions(tmp_path, willow_root):
    """torchrun with 2 CPU processes (gloo) vs 1 process, same thread count per process."""
    import os
    import socket
    import subprocess
    import sys

    model = tiny_sd(tmp_path / "tiny")
    common = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", str(model),
              "--resolution", "64", "--ensemble", "2", "--no-progress", "--device", "cpu", "--limit", "90"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          "-m", "sd4match", *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, "\n".join(l for l in two.stderr.splitlines() if "error" in l.lower())[-3000:]
    # the reference is a fresh process too, with the same thread count: an in-process run
    # (other threads' state, another pool size) was seen to differ in the last bits
    one = subprocess.run([sys.executable, "-m", "sd4match", *common, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    assert (tmp_path / "two/predictions.jsonl").read_bytes() == (tmp_path / "one/predictions.jsonl").read_bytes()
    assert len((tmp_path / "one/predictions.jsonl").read_text().splitlines()) == 90
    assert json.loads((tmp_path / "two/run-info.json").read_text())["processes"] == 2
    assert (tmp_path / "two/score.json").read_bytes() == (tmp_path / "one/score.json").read_bytes()  # the result does not say how it was run


def test_match_all_equals_four_single_rule_runs(tmp_path, willow_root, capsys):
    """--match all: one feature extraction, four predictions files and score tables, each equal
    to a run with that one rule."""
    model = tiny_sd(tmp_path / "tiny")
    base = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", str(model), "--resolution", "64", "--ensemble", "1",
            "--prompt", "text", "--limit", "12", "--no-progress", "--device", "cpu"]
    assert main(base + ["--match", "all", "--out", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((tmp_path / "all" / "score.json").read_text())
    assert list(doc["by_rule"]) == ["kernel-softargmax", "softargmax", "nn", "bilinear"] and doc["rule"] == "kernel-softargmax"
    assert not (tmp_path / "all" / "predictions.jsonl").exists()
    for rule in doc["by_rule"]:
        assert f"match {rule}" in printed
        one = tmp_path / rule
        assert main(base + ["--match", rule, "--out", str(one)]) == 0
        assert (tmp_path / "all" / f"predictions.{rule}.jsonl").read_text() == (one / "predictions.jsonl").read_text()
        single = json.loads((one / "score.json").read_text())
        del single["run"]
        assert doc["by_rule"][rule] == {k: v for k, v in single.items() if k not in ("dataset", "split")}
    assert {k: v for k, v in doc.items() if k not in ("rule", "by_rule", "run")} == {**doc["by_rule"]["kernel-softargmax"], "dataset": "pfwillow",
                                                                                      "split": "test"}
    assert len({json.dumps(doc["by_rule"][r]["per_point"]) for r in doc["by_rule"]}) > 1  # the rules really differ


def test_a_resume_with_other_call_sizes_is_refused_before_the_model_loads(tmp_path):
    """The VAE's call size shapes the bits (float noise), so an unfinished run resumes only
    with the one it started with; a run of an earlier version (one picture a call, no
    ``vae_batch`` recorded) resumes with ``--vae-batch 1`` and no other."""
    from sd4match.config import EvalConfig
    from sd4match.errors import Sd4MatchError
    from sd4match.evaluate import RUN, check_evaluation_folder, run_settings

    cfg = EvalConfig("pfwillow", str(tmp_path / "data"))
    base = {"model": "sd-2-1", "ensemble": 8}
    for earlier, now, ok in ((base, base, True),  # an earlier version's run, resumed with --vae-batch 1
                             (base, {**base, "vae_batch": 8}, False),  # ... with the new default
                             ({**base, "vae_batch": 8}, base, False),  # a batched run resumed one picture a call
                             ({**base, "vae_batch": 8}, {**base, "vae_batch": 8}, True)):
        out = tmp_path / f"run-{len(earlier)}-{len(now)}"
        out.mkdir()
        (out / RUN).write_text(json.dumps({"config": run_settings(cfg), "featurizer": {}, "request": earlier}))
        if ok:
            check_evaluation_folder(out, resume=True, cfg=cfg, request=now)
        else:
            with pytest.raises(Sd4MatchError, match=r"other settings \(request\.vae_batch\)"):
                check_evaluation_folder(out, resume=True, cfg=cfg, request=now)


def test_a_finished_evaluation_is_replaced_only_when_asked(tmp_path, willow_root, monkeypatch, capsys):
    """Rerunning a finished evaluation with its settings makes the same files again; other
    settings (the config, the model asked for) are refused before the model loads, naming
    them, and the folder is left byte for byte (before, a typo'd --out or a --limit run over
    a full one replaced the earlier predictions and score silently); --overwrite replaces it.
    From Python the featurizer's resolved settings are compared too."""
    import sd4match
    import sd4match.cli as cli
    from sd4match.config import EvalConfig
    from sd4match.errors import Sd4MatchError
    from sd4match.features import load_featurizer

    out = tmp_path / "eval"
    args = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", "effnet-lite0", "--resolution", "128",
            "--match", "nn", "--limit", "4", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    files = {f.name: f.read_bytes() for f in out.iterdir() if f.name != "run-info.json"}
    assert set(files) >= {"predictions.jsonl", "score.json"}
    assert json.loads(files["score.json"])["run"]["request"]["resolution"] == 128
    assert main(args) == 0  # the same settings: the same files
    assert {f: (out / f).read_bytes() for f in files} == files
    capsys.readouterr()

    real_load = cli.load_model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", no_load)
    for change, named in ((["--limit", "6"], "config.limit"), (["--resolution", "160"], "request.resolution"),
                          (["--match", "softargmax", "--protocol", "standard"], "config.protocol, config.rule")):
        assert main(args + change) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"sd4match: error: {out}: holds a finished evaluation made with other settings ({named}); "
                       "choose another --out, or pass --overwrite to replace it")
        assert {f: (out / f).read_bytes() for f in files} == files
    with pytest.raises(SystemExit):  # argparse: not both
        main(args + ["--limit", "6", "--overwrite", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setattr(cli, "load_model", real_load)
    assert main(args + ["--limit", "6", "--overwrite"]) == 0
    assert json.loads((out / "score.json").read_text())["n_pairs"] == 6

    # from Python (no model request recorded by the caller): the featurizer's own settings
    cfg = EvalConfig("pfwillow", str(willow_root), split="test", rule="nn", limit=6)
    before = (out / "score.json").read_bytes()
    with pytest.raises(Sd4MatchError, match=r"holds a finished evaluation made with other settings \(featurizer\.resolution\)"):
        sd4match.evaluate(load_featurizer("effnet-lite0", resolution=160), cfg, out, progress=False)
    assert (out / "score.json").read_bytes() == before and not (out / "predictions.partial.jsonl").exists()
    run = sd4match.evaluate(load_featurizer("effnet-lite0", resolution=160), cfg, out, progress=False, overwrite=True)
    assert run.score["run"]["config"]["settings"]["resolution"] == 160


def test_a_limited_evaluation_covers_every_category(tmp_path, willow_root):
    """--limit N takes each category's share of N from its first pairs (PF-Willow's and
    SPair-71k's splits are sorted by category: the first N pairs were one category, so a
    quick look, or a sweep with --limit, measured that category alone). By hand on 10 pairs
    A A A A A A B B B C: 5 -> one each, then 2 more shared 5 : 2 : 0 -> A .. B by largest
    remainder (10/7 and 4/7): A A B B C; 2 -> shared 6 : 3 : 1 -> A and B."""
    import numpy as np

    from sd4match.cli import main
    from sd4match.data.records import PairRecord, limit_pairs

    def rec(i, cat):
        return PairRecord(id=str(i), category=cat, src="a.jpg", trg="b.jpg", src_size=(10, 10), trg_size=(10, 10),
                          src_kps=np.zeros((1, 2)), trg_kps=np.zeros((1, 2)), src_bbox=None, trg_bbox=None, pck_base={})

    recs = [rec(i, c) for i, c in enumerate("AAAAAABBBC")]
    assert [r.id for r in limit_pairs(recs, 5)] == ["0", "1", "6", "7", "9"]
    assert [r.id for r in limit_pairs(recs, 2)] == ["0", "6"]
    assert limit_pairs(recs, 0) == recs and limit_pairs(recs, 10) == recs and limit_pairs(recs, 99) == recs
    out = tmp_path / "ev"
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", "effnet-lite0", "--resolution", "128",
                 "--match", "nn", "--limit", "10", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    doc = json.loads((out / "score.json").read_text())
    assert doc["n_pairs"] == 10 and set(doc["per_image"]["by_category"]) == {"car(G)", "car(S)", "duck(S)", "motorbike(M)", "winebottle(wC)"}
    assert doc["run"]["config"]["limit_pairs"] == "category-share"
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["0", "1", "90", "91", "180", "181", "270", "271", "360", "361"]  # each sub-class's first two, in the split's order


def test_a_run_names_the_hub_snapshot_its_weights_came_from(tmp_path, willow_root, monkeypatch):
    """The registry's SD 2.1 is not pinned to a commit: a number must name the weights that
    made it. A model loaded from the hub cache (laid out as huggingface_hub lays it out:
    refs/main -> snapshots/<commit>) is recorded with that commit in score.json and in a
    training run's config.json; a local folder has none to record."""
    from huggingface_hub import constants

    from conftest import hub_snapshot
    from sd4match.config import EvalConfig
    from sd4match.evaluate import evaluate, weights_record
    from sd4match.features import SDFeaturizer
    from sd4match.train import Trainer, TrainConfig

    commit = "c" * 40
    snapshot = tiny_sd(hub_snapshot(tmp_path / "hub", "me/tiny-sd", commit))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    feat = SDFeaturizer.from_pretrained(snapshot, resolution=64, ensemble=1)
    assert weights_record(feat) == {}  # a folder: nothing to name
    feat.model_id = "me/tiny-sd"  # as loaded from the hub
    assert weights_record(feat) == {"weights": {"me/tiny-sd": commit}}
    from sd4match.features.registry import weights_identity

    assert weights_identity("me/tiny-sd") == commit and weights_identity("effnet-lite0") is None and weights_identity("me/not-cached") is None
    cfg = EvalConfig("pfwillow", str(willow_root), prompt="empty", rule="nn", limit=2)
    evaluate(feat, cfg, tmp_path / "ev", progress=False)
    assert json.loads((tmp_path / "ev" / "score.json").read_text())["run"]["weights"] == {"me/tiny-sd": commit}
    tcfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model="me/tiny-sd", resolution=64, steps=1, batch_size=1,
                       val_every=0, device="cpu")
    Trainer(tcfg, tmp_path / "run", featurizer=feat, progress=False).run()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["weights"] == {"me/tiny-sd": commit}
    # the prompt it hands on says so too (prompts show, the hub model card)
    from sd4match.prompts.base import describe_training, read_prompt_config

    training = read_prompt_config(tmp_path / "run" / "best").training
    assert training["weights"] == {"me/tiny-sd": commit} and describe_training(training).endswith(f"; weights me/tiny-sd@{'c' * 12}")

    # a run continued after the hub cache moved to another snapshot would mix two sets of
    # weights: refused before the model loads (and again after, in case the load fetched it)
    import shutil

    import sd4match.evaluate as ev
    from sd4match.errors import Sd4MatchError
    from sd4match.evaluate import RUN, check_evaluation_folder
    from sd4match.train import check_run_folder

    def stop_at_second_pair(folder, where, until=None):
        if where == "pair:1":
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "hang_for_tests", stop_at_second_pair)
    with pytest.raises(KeyboardInterrupt):
        evaluate(feat, cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert json.loads((tmp_path / "cut" / RUN).read_text())["weights"] == {"me/tiny-sd": commit}
    newer = "d" * 40
    shutil.copytree(snapshot, snapshot.parent / newer)
    refs = tmp_path / "hub" / "models--me--tiny-sd" / "refs" / "main"
    refs.write_text(newer)  # `hf download` after the repository moved on
    moved = rf"the run began with me/tiny-sd at snapshot {commit}, but the hub cache now holds {newer}: .*hf download me/tiny-sd --revision {commit}"
    with pytest.raises(Sd4MatchError, match=moved):
        check_evaluation_folder(tmp_path / "cut", resume=True, cfg=cfg)
    with pytest.raises(Sd4MatchError, match=moved):
        evaluate(feat, cfg, tmp_path / "cut", progress=False, resume=True)
    with pytest.raises(Sd4MatchError, match=moved):
        check_run_folder(tmp_path / "run", resume=True, resume_or_start=False)
    with pytest.raises(Sd4MatchError, match=moved):
        check_run_folder(tmp_path / "run", resume=False, resume_or_start=True)
    refs.write_text(commit)  # the snapshot it began with: it continues
    evaluate(feat, cfg, tmp_path / "cut", progress=False, resume=True)
    assert (tmp_path / "cut" / "predictions.jsonl").read_bytes() == (tmp_path / "ev" / "predictions.jsonl").read_bytes()
    assert check_run_folder(tmp_path / "run", resume=True, resume_or_start=False)


def test_stored_maps_of_weights_written_over_are_not_handed_back(tmp_path, willow_root):
    """``--cache-dir`` keeps maps and posteriors across runs under keys made of the picture
    and the settings, the model among them by its name (a folder's path): weights written
    over in place (a fine-tuned model saved to the same folder) were handed the first
    weights' maps. Entries now name their weights (``registry.weights_identity``): others
    are recomputed; entries that name none (an earlier release's) are found as before."""
    import torch

    from sd4match.config import EvalConfig
    from sd4match.evaluate import evaluate
    from sd4match.features import SDFeaturizer
    from sd4match.features.registry import weights_identity
    from sd4match.store import Store

    model = tiny_sd(tmp_path / "model")
    cfg = EvalConfig("pfwillow", str(willow_root), prompt="empty", limit=2)

    def run(out: str, store: Store) -> bytes:
        feat = SDFeaturizer.from_pretrained(model, resolution=64, ensemble=1)
        evaluate(feat, cfg, tmp_path / out, progress=False, store=store)
        return (tmp_path / out / "predictions.jsonl").read_bytes()

    first_id = weights_identity(str(model))
    assert weights_identity(f"{model}+dinov2-b") == f"{first_id}+-"  # a fusion: both parts (uncached DINOv2: none)
    first = run("first", Store(folder=tmp_path / "cache"))
    again = Store(folder=tmp_path / "cache")
    assert run("again", again) == first and again.stats["features.disk"] == 4 and not again.stats["features.miss"]
    tiny_sd(model, seed=1)  # other weights, the same folder
    assert weights_identity(str(model)) not in (None, first_id)
    over = Store(folder=tmp_path / "cache")
    written_over = run("over", over)
    assert over.stats["posterior.stale"] == 4 and not over.stats["features.disk"]  # maps and posteriors made again
    assert written_over == run("fresh", Store()) != first
    # an entry that names no weights (as an earlier release wrote it) is found by its key
    old = Store(folder=tmp_path / "old")
    old.put("features", "k", {"features": torch.ones(1, 2)})
    later = Store(folder=tmp_path / "old")
    assert later.contains("features", "k", made_by={"weights": "x"}) and later.get("features", "k", made_by={"weights": "x"}) is not None
    later.put("features", "k2", {"features": torch.ones(1, 2)}, meta={"weights": "x"})
    fresh = Store(folder=tmp_path / "old")
    assert not fresh.contains("features", "k2", made_by={"weights": "y"}) and fresh.get("features", "k2", made_by={"weights": "y"}) is None
    assert fresh.contains("features", "k2", made_by={"weights": "x"})


def test_an_evaluation_of_some_categories_scores_them_as_a_full_run_does(tmp_path, willow_root, capsys):
    """--categories: only those categories' pairs (--limit then takes each one's share of
    them). car(G)'s first 4 pairs are what `--limit 20` takes of it too (450 pairs, 5
    sub-classes of 90: 4 each), so their predictions and car(G)'s score are the same; the
    run records its categories, `score` and `compare` keep such a run apart."""
    import numpy as np

    from sd4match.data import open_dataset
    from sd4match.data.records import select_pairs
    from sd4match.errors import DataError

    recs = open_dataset("pfwillow", willow_root).pairs("test")
    assert [r.id for r in select_pairs(recs, categories=["duck(S)", "car(G)"], limit=4)] == ["0", "1", "180", "181"]
    with pytest.raises(DataError, match=r"category 'duck' has no pair here; the categories are car\(G\), car\(S\), duck\(S\)"):
        select_pairs(recs, categories=["duck"])
    common = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", "effnet-lite0", "--resolution", "128",
              "--match", "nn", "--no-progress", "--device", "cpu"]
    some, every = tmp_path / "some", tmp_path / "every"
    assert main([*common, "--categories", "car(G)", "--limit", "4", "--out", str(some)]) == 0
    assert "| categories: car(G) | 4 pairs, 40 points" in capsys.readouterr().out
    assert main([*common, "--limit", "20", "--out", str(every)]) == 0
    capsys.readouterr()
    mine = {json.loads(line)["id"]: json.loads(line)["kps"] for line in (some / "predictions.jsonl").read_text().splitlines()}
    full = {json.loads(line)["id"]: json.loads(line)["kps"] for line in (every / "predictions.jsonl").read_text().splitlines()}
    assert list(mine) == ["0", "1", "2", "3"] and all(np.array_equal(mine[k], full[k]) for k in mine)
    a, b = (json.loads((d / "score.json").read_text()) for d in (some, every))
    assert a["per_image"]["by_category"] == {"car(G)": b["per_image"]["by_category"]["car(G)"]} and a["per_image"]["all"] == a["per_image"]["by_category"]["car(G)"]
    assert a["categories"] == ["car(G)"] and a["run"]["config"]["categories"] == ["car(G)"] and "categories" not in b["run"]["config"]
    # another selection into the same folder is refused; compare keeps the two runs apart
    assert main([*common, "--categories", "duck(S)", "--limit", "4", "--out", str(some)]) == 2
    assert "other settings (config.categories)" in capsys.readouterr().err
    assert main(["compare", str(some), str(every), "--out", str(tmp_path / "cmp")]) == 2
    assert "scored on different pairs" in capsys.readouterr().err
    # score: a file of one category's predictions is told how to score them
    preds = tmp_path / "car.jsonl"
    preds.write_text("".join(json.dumps({"id": r.id, "kps": r.trg_kps.tolist()}) + "\n" for r in recs if r.category == "car(G)"))
    base = ["score", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--predictions", str(preds)]
    assert main(base) == 2
    assert "holds the pairs of 1 of the split's categories, those `evaluate --categories car(G)` takes: pass --categories car(G)" in capsys.readouterr().err
    assert main([*base, "--categories", "car(G)", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n_pairs"] == 90 and got["categories"] == ["car(G)"] and got["per_image"]["all"]["0.1"] == 1.0


def test_your_own_featurizer_is_evaluated_as_the_built_in_ones(tmp_path, willow_root):
    """A subclass of sd4match.Featurizer with only grid_size, settings and forward (no
    parameters, so no device of its own) runs through evaluate: one-hot cell features make
    nearest-neighbour matching put each point at the centre of the same cell of the target,
    computed here by hand from the picture sizes, and its scores equal `score` on them."""
    import numpy as np
    import torch

    import sd4match
    from sd4match.data import open_dataset

    class SamePlace(sd4match.Featurizer):
        model_id, resolution = "same-place", 64

        @property
        def grid_size(self):
            return (8, 6)  # (w, h): not square, so x and y cannot be mixed up unseen

        def settings(self):
            return {"featurizer": self.model_id}

        def forward(self, images, **unused):
            x = sd4match.images_to_tensor(images, self.resolution, device=self.device)
            return torch.eye(48).reshape(48, 6, 8).expand(len(x), -1, -1, -1)

    cfg = sd4match.EvalConfig("pfwillow", str(willow_root), rule="nn", protocol="standard", limit=20)
    run = sd4match.evaluate(SamePlace(), cfg, tmp_path / "e", progress=False)
    recs = {r.id: r for r in open_dataset("pfwillow", willow_root).pairs("test")}
    preds = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 20
    for p in preds:
        r = recs[p["id"]]
        (ws, hs), (wt, ht) = r.src_size, r.trg_size
        col = np.minimum(np.floor(r.src_kps[:, 0] * 8 / ws), 7)
        row = np.minimum(np.floor(r.src_kps[:, 1] * 6 / hs), 5)
        np.testing.assert_allclose(p["kps"], np.stack([(col + 0.5) * wt / 8, (row + 0.5) * ht / 6], axis=1), rtol=0, atol=1e-4)  # float32
    scored = sd4match.score([recs[p["id"]] for p in preds], {p["id"]: p["kps"] for p in preds}, protocol="standard")
    assert scored["per_image"]["all"] == run.score["per_image"]["all"]


def test_a_prompt_evaluated_on_the_split_it_learned_from_is_said_to_be_not_held_out(tmp_path, willow_root):
    """The prompt folder records its training data: evaluating it on that very split of a
    benchmark warns (its numbers would be read as held out); another split, or your own
    synthetic data (whose pairs depend on the root), does not."""
    import warnings

    from sd4match.config import EvalConfig
    from sd4match.errors import Sd4MatchWarning
    from sd4match.evaluate import evaluate
    from sd4match.features import load_featurizer
    from sd4match.prompts import make_prompt

    feat = load_featurizer(str(tiny_sd(tmp_path / "tiny")), resolution=64, ensemble=1)
    for name, dataset, split in (("seen", "pfwillow", "test"), ("other", "pfwillow", "trn"), ("own", "synthetic", "test")):
        make_prompt("single", feat).save(tmp_path / name, dataset=dataset, split=split, step=1)
    cfg = dict(dataset="pfwillow", root=str(willow_root), split="test", limit=5, rule="nn")
    with pytest.warns(Sd4MatchWarning, match=r"the prompt was trained on pfwillow/test, the split it is evaluated on: its scores there are not held out"):
        evaluate(feat, EvalConfig(prompt=str(tmp_path / "seen"), **cfg), tmp_path / "e1", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Sd4MatchWarning)
        evaluate(feat, EvalConfig(prompt=str(tmp_path / "other"), **cfg), tmp_path / "e2", progress=False)
        evaluate(feat, EvalConfig(prompt=str(tmp_path / "own"), **{**cfg, "dataset": "synthetic"}), tmp_path / "e3", progress=False)
