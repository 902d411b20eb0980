"""The paper's open questions as settings: several layers from one UNet pass, noise schedules,
and (with the sweep) the grid over them; tiny random SD."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer
from sd4match.testing import WorkCounter as Work, tiny_sd


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("m") / "sd2")


def pictures():
    rng = np.random.default_rng(0)
    return [Image.new("RGB", (90, 70), (200, 40, 10)), Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8))]


def test_several_layers_from_one_pass_equal_the_single_layer_runs(sd_path):
    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=2)
    calls = []
    h = feat.unet.conv_in.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            both = feat(pictures(), generator=torch.Generator().manual_seed(3), layers=(0, 1))
    finally:
        h.remove()
    assert len(calls) == 1 and set(both) == {0, 1}  # one UNet pass for the two layers
    for k in (0, 1):
        feat.reconfigure(up_block=k)
        with torch.no_grad():
            one = feat(pictures(), generator=torch.Generator().manual_seed(3))
        assert one.shape == both[k].shape and feat.grid_of(k) == tuple(one.shape[-1:-3:-1])
        assert torch.equal(one, both[k]), k
    with pytest.raises(Sd4MatchError, match="layers must be in"):
        feat(pictures(), layers=(7,))


def test_schedules_with_equal_cumulative_alphas_give_identical_features(sd_path):
    """Noising at t depends only on the cumulative alphas: every scheduler class on the model's
    betas noises alike, bit for bit (Euler's x + sigma * noise once scaled as its
    scale_model_input scales it, DPM-Solver's VP noising); another beta schedule does not."""
    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=2)
    base = type(feat.scheduler).__name__

    def maps(schedule):
        feat.reconfigure(noise_schedule=schedule)
        with torch.no_grad():
            return feat(pictures(), generator=torch.Generator().manual_seed(1))

    beta = feat.scheduler.config.beta_schedule
    ref = maps("model")
    for same in ("DDPM", "DDIM", "PNDM", "Euler", "DPMSolver", "LMS", f"model:{beta}"):
        assert torch.equal(maps(same), ref), same
    other = "linear" if beta != "linear" else "squaredcos_cap_v2"
    assert (maps(f"DDPM:{other}") - ref).abs().max() > 1e-3
    assert feat.settings()["noise_schedule"] == f"DDPM:{other}"
    feat.reconfigure(noise_schedule="model")
    assert "noise_schedule" not in feat.settings()  # the default keeps the keys of stored maps
    from sd4match.config import NOISE_SCHEDULE_TEXT
    from sd4match.features.sd import BETA_SCHEDULES, NOISE_SCHEDULERS

    assert all(name in NOISE_SCHEDULE_TEXT for name in (*NOISE_SCHEDULERS, *BETA_SCHEDULES))  # the flag's help names every choice
    for bad, msg in (("Foo", "unknown scheduler"), ("DDIM:cubic", "unknown beta schedule")):
        with pytest.raises(Sd4MatchError, match=msg):
            feat.reconfigure(noise_schedule=bad)
    assert base


def test_sweep_cells_equal_separate_evaluations_and_a_rerun_computes_nothing(sd_path, willow_root, tmp_path, capsys, monkeypatch):
    """A 3 x 2 sweep (t x layer) on the real PF-Willow fixture: 6 cells, each with the
    predictions a separate `evaluate` with its settings writes; the VAE runs once per picture
    over the whole grid; the two layers of a timestep come from one UNet pass; a rerun runs no
    model; the plots exist with their axes labelled."""
    import json

    from sd4match.cli import main
    from sd4match.config import EvalConfig
    from sd4match.data import open_dataset
    from sd4match.sweep import sweep

    from sd4match.data.records import limit_pairs

    recs = limit_pairs(open_dataset("pfwillow", willow_root).pairs("test"), 10)  # what --limit 10 evaluates
    n_pics = len({p for r in recs for p in (r.src, r.trg)})
    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=2)
    cfg = EvalConfig("pfwillow", str(willow_root), prompt="text", rule="nn", limit=10)
    w = Work(feat)
    try:
        res = sweep(feat, cfg, tmp_path / "s", timesteps=(50, 261, 500), up_blocks=(0, 1), ensembles=(2,), records=recs, progress=False)
    finally:
        w.close()
    assert res["ran"] == 6 and len(res["cells"]) == 6
    cells = sorted(p.name for p in (tmp_path / "s" / "sweep").iterdir())
    assert cells == [f"t{t:04d}-b{k}-e2" for t in (50, 261, 500) for k in (0, 1)]
    assert len(w.vae) == len(set(w.vae)) == n_pics  # each picture through the VAE once, for the whole grid
    assert len(w.unet) == 3 * -(-n_pics // 16)  # per timestep one pass for both layers: 16 pictures x 2 copies a call
    base = ["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", str(sd_path), "--resolution", "64",
            "--ensemble", "2", "--prompt", "text", "--match", "nn", "--limit", "10", "--device", "cpu", "--no-progress"]
    for t, k in ((t, k) for t in (50, 261, 500) for k in (0, 1)):
        one = tmp_path / f"one-{t}-{k}"
        assert main(base + ["--timestep", str(t), "--up-block", str(k), "--out", str(one)]) == 0
        cell = tmp_path / "s" / "sweep" / f"t{t:04d}-b{k}-e2"
        assert (cell / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()
        a, b = json.loads((cell / "score.json").read_text()), json.loads((one / "score.json").read_text())
        assert a["run"]["config"]["settings"] == b["run"]["config"]["settings"]
        assert {k2: v for k2, v in a.items() if k2 != "run"} == {k2: v for k2, v in b.items() if k2 != "run"}
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    best = max(doc["cells"], key=lambda r: r["per_image"]["0.1"])
    assert doc["best"] == best and "**" in (tmp_path / "s" / "table.md").read_text()
    assert (tmp_path / "s" / "table.csv").read_text().count("\n") == 7
    for png in ("pck_vs_t.png", "heatmap.png"):
        assert (tmp_path / "s" / png).stat().st_size > 10_000
    assert res["plots"]["pck_vs_t.png"]["labels"] == [("timestep t", "PCK@0.1 (%)"), ("timestep t", "")]  # the panels share the y axis
    assert res["plots"]["heatmap.png"]["labels"] == [("timestep t", "layer")]
    assert res["plots"]["pck_vs_t.png"]["legend"] == ["up_blocks[0]", "up_blocks[1]"]  # one ensemble, one schedule: nothing more to tell apart
    assert res["plots"]["heatmap.png"]["title"] == "pfwillow/test, 10 pairs, prompt text, nn, sd4match protocol"
    capsys.readouterr()

    # the rerun, through the command line: every cell is done, so no model runs
    w = Work(feat)
    monkeypatch.setattr("sd4match.cli.load_model", lambda m: feat)
    try:
        argv = ["sweep", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", str(sd_path), "--resolution", "64",
                "--ensembles", "2", "--prompt", "text", "--match", "nn", "--limit", "10", "--timesteps", "50,261,500", "--up-blocks", "0,1",
                "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s")]
        assert main(argv) == 0
    finally:
        w.close()
    assert w.unet == [] and w.vae == []
    assert "0 cells evaluated now, 6 read from earlier runs" in capsys.readouterr().out
    # the same folder with other settings is refused
    assert main([*argv[:-1], str(tmp_path / "s"), "--protocol", "standard"]) == 2
    assert "holds a sweep with other settings (protocol)" in capsys.readouterr().err


def test_sweep_pictures_share_one_colour_scale_and_name_what_differs(tmp_path):
    """Two noise schedules, one ensemble: the heat maps share one colour scale (before, each
    panel stretched its own range, so equal colours meant different PCK), lines and panels
    name the schedule (before: 'ensemble 1' on every line, the model's schedule unnamed),
    and both pictures say what they were computed on."""
    from sd4match.sweep import plot_sweep

    def row(t, k, s, pck):
        return {"timestep": t, "up_block": k, "ensemble": 1, "noise_schedule": s, "n_pairs": 10, "per_image": {"0.1": pck}, "per_point": {"0.1": pck}}

    rows = [row(t, k, "model", 0.1 + 0.01 * t / 100 + 0.1 * k) for t in (0, 500) for k in (0, 1)]
    rows += [row(t, k, "model:linear", 0.02 * (k + 1)) for t in (0, 500) for k in (0, 1)]
    drawn = plot_sweep(rows, tmp_path, "0.1", "pfwillow/test, 10 pairs")
    lo, hi = 100 * min(r["per_image"]["0.1"] for r in rows), 100 * max(r["per_image"]["0.1"] for r in rows)
    assert drawn["heatmap.png"]["colour_ranges"] == [pytest.approx((lo, hi))] * 2
    assert [t.splitlines()[0] for t in drawn["heatmap.png"]["panels"]] == ["PCK@0.1 per image (%), ensemble 1, model", "PCK@0.1 per image (%), ensemble 1, model:linear"]
    assert drawn["pck_vs_t.png"]["legend"] == ["up_blocks[0], model", "up_blocks[1], model", "up_blocks[0], model:linear", "up_blocks[1], model:linear"]
    assert drawn["pck_vs_t.png"]["title"] == drawn["heatmap.png"]["title"] == "pfwillow/test, 10 pairs"


def test_grid_grammar():
    from sd4match.sweep import parse_grid, parse_schedules

    assert parse_grid("50,100,261") == (50, 100, 261) and parse_grid("0:1000:250") == (0, 250, 500, 750)
    assert parse_schedules("model,DDIM:linear") == ("model", "DDIM:linear")
    for bad in ("a,b", "10:5:0", "5:1"):
        with pytest.raises(ValueError):
            parse_grid(bad)
    with pytest.raises(ValueError, match="unknown scheduler"):
        parse_schedules("Foo")


@pytest.mark.long
def test_sweep_under_torchrun_writes_the_tables_of_one_process(sd_path, willow_root, tmp_path, two_and_one_process):
    """torchrun with 2 CPU processes (gloo): the cells' pairs are shared by the processes, the
    first writes the tables, and every cell's predictions, the table and sweep.json's cells
    equal a one-process sweep's (same thread count per process, both fresh processes)."""
    import json

    common = ["sweep", "--prompt", "text", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--limit", "9",
              "--timesteps", "50,261", "--up-blocks", "0,1", "--ensembles", "2", "--model", str(sd_path), "--resolution", "64",
              "--device", "cpu", "--no-progress"]
    two_and_one_process(common, tmp_path / "two", tmp_path / "one")
    cells = sorted(p.name for p in (tmp_path / "one" / "sweep").iterdir())
    assert cells == ["t0050-b0-e2", "t0050-b1-e2", "t0261-b0-e2", "t0261-b1-e2"]
    assert sorted(p.name for p in (tmp_path / "two" / "sweep").iterdir()) == cells
    for c in cells:
        preds = (tmp_path / "one" / "sweep" / c / "predictions.jsonl").read_bytes()
        assert len(preds.splitlines()) == 9 and (tmp_path / "two" / "sweep" / c / "predictions.jsonl").read_bytes() == preds, c
        assert json.loads((tmp_path / "two" / "sweep" / c / "run-info.json").read_text())["processes"] == 2
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
    cells_of = lambda d: json.loads((tmp_path / d / "sweep.json").read_text())["cells"]  # noqa: E731
    assert cells_of("two") == cells_of("one")


def test_an_interrupted_sweep_refuses_other_settings_for_its_cells(sd_path, willow_root, tmp_path, monkeypatch):
    """A sweep stopped after its first cell (a KeyboardInterrupt in the second) keeps that
    cell; a rerun with another prompt is refused instead of reusing the cell computed with the
    first one; the same settings finish the grid, evaluating only the cells not done."""
    import json

    import sd4match.sweep as sweep_mod
    from sd4match.config import EvalConfig

    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
    real, calls = sweep_mod.evaluate, []

    def stop_at_second(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "evaluate", stop_at_second)
    cfg = EvalConfig("pfwillow", str(willow_root), prompt="text", rule="nn", limit=4)
    grid = {"timesteps": (50, 261), "up_blocks": (1,), "ensembles": (1,), "progress": False}
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.sweep(feat, cfg, tmp_path / "s", **grid)
    assert (tmp_path / "s" / "sweep" / "t0050-b1-e1" / "score.json").is_file()
    assert not (tmp_path / "s" / "sweep" / "t0261-b1-e1" / "score.json").exists()
    with pytest.raises(Sd4MatchError, match=r"holds a sweep with other settings \(prompt\)"):
        sweep_mod.sweep(feat, EvalConfig("pfwillow", str(willow_root), prompt="empty", rule="nn", limit=4), tmp_path / "s", **grid)
    other = SDFeaturizer.from_pretrained(sd_path, resolution=128, ensemble=1)  # the model's own settings count too
    with pytest.raises(Sd4MatchError, match=r"holds a sweep with other settings \(resolution\)"):
        sweep_mod.sweep(other, cfg, tmp_path / "s", **grid)
    monkeypatch.setattr(sweep_mod, "evaluate", real)
    res = sweep_mod.sweep(feat, cfg, tmp_path / "s", **grid)
    assert res["ran"] == 1 and [r["cell"] for r in res["cells"]] == ["t0050-b1-e1", "t0261-b1-e1"]
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["ran"] == 1


def test_sweep_tables_add_the_geometry_aware_subset_when_every_cell_has_it(tmp_path):
    """On SPair-71k and AP-10K each cell's score has the geometry-aware subset: the sweep's
    table puts its PCK beside the rest (which timestep and layer tell mirrored twins apart)."""
    import csv

    from sd4match.config import EvalConfig
    from sd4match.sweep import write_tables

    def row(t, pck, geo=None):
        r = {"timestep": t, "up_block": 1, "ensemble": 1, "noise_schedule": "model", "n_pairs": 7,
             "per_image": {"0.1": pck}, "per_point": {"0.1": pck}}
        if geo is not None:
            r["geo_aware"] = {"per_image": {"0.1": geo}, "per_point": {"0.1": geo / 2}, "twin_swaps": {"0.1": geo / 5}}
        return r

    cfg = EvalConfig("spair", str(tmp_path))
    write_tables([row(50, 0.5, 0.25), row(261, 0.6, 0.5)], tmp_path, cfg, "0.1")
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [(r["timestep"], r["geo-aware per image @0.1"], r["geo-aware per point @0.1"], r["geo-aware on a twin @0.1"]) for r in rows] == [
        ("50", "25.00", "12.50", "5.00"), ("261", "50.00", "25.00", "10.00")]
    write_tables([row(50, 0.5, 0.25), row(261, 0.6)], tmp_path, cfg, "0.1")  # a cell of an earlier release: no such column
    assert "geo-aware per image @0.1" not in next(csv.DictReader((tmp_path / "table.csv").open()))


def test_a_sweep_of_some_categories_reads_their_pairs_and_says_so(sd_path, willow_root, tmp_path):
    import json

    from sd4match.config import EvalConfig
    from sd4match.sweep import sweep

    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=1)
    cfg = EvalConfig("pfwillow", str(willow_root), prompt="empty", rule="nn", limit=2, categories=("duck(S)",))
    sweep(feat, cfg, tmp_path / "s", timesteps=(50,), up_blocks=(1,), ensembles=(1,), progress=False)
    ids = [json.loads(line)["id"] for line in (tmp_path / "s" / "sweep" / "t0050-b1-e1" / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["180", "181"]  # duck(S)'s first two pairs
    assert (tmp_path / "s" / "table.md").read_text().startswith("# Sweep: pfwillow/test (duck(S)), prompt empty")
    with pytest.raises(Sd4MatchError, match=r"holds a sweep with other settings \(categories\)"):
        sweep(feat, EvalConfig("pfwillow", str(willow_root), prompt="empty", rule="nn", limit=2), tmp_path / "s", timesteps=(50,), up_blocks=(1,),
              ensembles=(1,), progress=False)
