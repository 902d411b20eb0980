"""``sd4match sweep``: a grid of evaluations over timestep x layer (x ensemble x noise schedule).

Each cell is a full evaluation, in ``<out>/sweep/<cell>/`` (``predictions.jsonl``,
``score.json``), equal to ``sd4match evaluate`` with that cell's settings. A cell whose
``score.json`` exists is not run again, so a rerun resumes the grid. Work is shared where it
can be: one store keeps every picture's VAE posterior (and DINOv2 tokens) for the whole
grid, pinned so that feature maps never push them out; the layers of one (timestep,
ensemble, schedule) come from one UNet pass per picture (``evaluate_layers``). The result:
``sweep.json``, ``table.md`` / ``table.csv``, ``pck_vs_t.png`` (PCK against t, one line per
layer, per image and per point) and ``heatmap.png`` (t x layer, the best cell marked).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from sd4match.config import EvalConfig, parse_names
from sd4match.data.records import limit_rule_changed
from sd4match.errors import Sd4MatchError
from sd4match.evaluate import RUN, evaluate, evaluate_layers, run_settings
from sd4match.features.sd import SDFeaturizer, parse_noise_schedule
from sd4match.fileio import atomic_write_text, csv_text, markdown_table
from sd4match.metrics import alpha_key, geo_aware_all, geo_aware_columns
from sd4match.runtime import distributed_rank_world, locks_out
from sd4match.store import Store
from sd4match.viz import pyplot

__all__ = ["Cell", "parse_grid", "sweep"]



def parse_grid(text: str) -> tuple[int, ...]:
    """``"50,100,261"`` or ``"start:stop:step"`` (Python's range: stop excluded) -> the values."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                raise ValueError
            vals = tuple(range(*parts))
        else:
            vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{text!r}: expected a comma-separated list of integers or start:stop:step") from None
    if not vals:
        raise ValueError(f"{text!r} gives no values")
    return tuple(dict.fromkeys(vals))


def parse_schedules(text: str) -> tuple[str, ...]:
    """``"model,DDIM:linear"`` -> the noise schedules, each checked."""
    vals = parse_names(text)
    for v in vals:
        try:
            parse_noise_schedule(v)
        except Sd4MatchError as e:
            raise ValueError(str(e)) from None
    return vals


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    timestep: int
    up_block: int
    ensemble: int
    noise_schedule: str = "model"

    @property
    def name(self) -> str:
        sched = "" if self.noise_schedule == "model" else "-" + self.noise_schedule.replace(":", "_")
        return f"t{self.timestep:04d}-b{self.up_block}-e{self.ensemble}{sched}"


@locks_out("sweep")
def sweep(featurizer, cfg: EvalConfig, out: str | Path, *, timesteps: Sequence[int], up_blocks: Sequence[int], ensembles: Sequence[int] = (8,),
          noise_schedules: Sequence[str] = ("model",), dino=None, records=None, progress: bool = True, store_gb: float = 4.0,
          cache_dir: str | Path | None = None) -> dict:
    """Evaluate every cell of the grid (skipping those done), then write the tables and plots.

    Args:
        featurizer: a Stable Diffusion featurizer (SD, or SD + DINOv2: then the layers of a
            cell group run one by one).
        cfg: the evaluation every cell shares (dataset, split, prompt, rule, protocol, ...).

    Returns:
        ``{"cells": [...rows], "ran": cells evaluated now, "best": the best row}``.
    """
    out = Path(out)
    if not featurizer.has_posterior:
        raise Sd4MatchError(f"{featurizer.model_id}: a sweep varies timestep and layer: it needs a Stable Diffusion model")
    rank, _ = distributed_rank_world()
    cells = [Cell(t, k, e, s) for s, e, t, k in itertools.product(noise_schedules, ensembles, timesteps, up_blocks)]
    grid_keys = ("timestep", "up_block", "ensemble", "noise_schedule")
    record = {"config": run_settings(cfg), "model": featurizer.model_id,
              "featurizer": {k: v for k, v in featurizer.settings().items() if k not in grid_keys},  # resolution, dtype, ...
              "grid": {"timesteps": list(timesteps), "up_blocks": list(up_blocks), "ensembles": list(ensembles), "noise_schedules": list(noise_schedules)}}
    _check_record(out, record)
    if rank == 0 and not (out / "sweep.json").is_file():  # the record first: a rerun of an interrupted sweep is checked against it
        atomic_write_text(out / "sweep.json", json.dumps({"record": record, "cells": [], "ran": 0}, indent=2))
    store = Store(int(store_gb * (1 << 30)), cache_dir, pinned=("posterior", "dino"))
    stackable = isinstance(featurizer, SDFeaturizer)
    ran = 0
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.timestep, c.ensemble, c.noise_schedule), []).append(c)
    for (t, e, s), group in groups.items():
        todo = [c for c in group if not (out / "sweep" / c.name / "score.json").is_file()]
        if not todo:
            continue
        featurizer.reconfigure(timestep=t, ensemble=e, noise_schedule=s)
        if len(todo) > 1 and stackable and not any((out / "sweep" / c.name / RUN).is_file() for c in todo):
            evaluate_layers(featurizer, cfg, {c.up_block: out / "sweep" / c.name for c in todo}, dino=dino, progress=progress, records=records, store=store)
        else:
            for c in todo:
                featurizer.reconfigure(up_block=c.up_block)
                cell = out / "sweep" / c.name
                evaluate(featurizer, cfg, cell, dino=dino, progress=progress, records=records, store=store, resume=(cell / RUN).is_file())
        store.drop("features")  # maps of one setting are never read by another cell
        ran += len(todo)
    rows = [_row(c, json.loads((out / "sweep" / c.name / "score.json").read_text()), cfg) for c in cells] if rank == 0 else []
    summary = {"record": record, "cells": rows, "ran": ran}
    if rank == 0:
        key = alpha_key(0.1 if 0.1 in cfg.alphas else cfg.alphas[0])
        summary["best"] = max(rows, key=lambda r: r["per_image"][key]) if rows else None
        summary["alpha"] = key
        atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
        write_tables(rows, out, cfg, key)
        what = f"{_split_words(cfg)}, {rows[0]['n_pairs']:,} pairs, prompt {cfg.prompt}, {cfg.rule}, {cfg.protocol} protocol" if rows else ""
        summary["plots"] = plot_sweep(rows, out, key, what)
    return summary


def _check_record(out: Path, record: dict) -> None:
    """A sweep folder holds one sweep: other settings than its record are refused (the grid may grow)."""
    f = out / "sweep.json"
    if not f.is_file():
        return
    try:
        earlier = json.loads(f.read_text())["record"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Sd4MatchError(f"{f}: unreadable; move it away to start the sweep again") from None
    # the settings this release records (one an earlier release recorded and this one dropped is not compared;
    # one given then and left out now, as --categories, is)
    known = set(record["config"]) | ({f.name for f in fields(EvalConfig)} & set(earlier["config"]))
    diff = sorted(k for k in known if earlier["config"].get(k) != record["config"].get(k))
    if "featurizer" in earlier:  # a sweep.json written before this field existed is checked on its config and model only
        mine, theirs = record["featurizer"], earlier["featurizer"]
        diff += sorted(k for k in set(mine) | set(theirs) if k != "model" and mine.get(k) != theirs.get(k))
    if diff or earlier.get("model") != record["model"]:
        what = ", ".join(diff + ([] if earlier.get("model") == record["model"] else ["model"]))
        raise Sd4MatchError(f"{out}: holds a sweep with other settings ({what}{limit_rule_changed(diff)}); use the same ones or another --out")


def _row(c: Cell, doc: dict, cfg: EvalConfig) -> dict:
    return {"cell": c.name, "timestep": c.timestep, "up_block": c.up_block, "ensemble": c.ensemble, "noise_schedule": c.noise_schedule,
            "n_pairs": doc["n_pairs"], "per_image": doc["per_image"]["all"], "per_point": doc["per_point"]["all"], "geo_aware": geo_aware_all(doc)}


def write_tables(rows: Sequence[dict], out: Path, cfg: EvalConfig, key: str) -> None:
    alphas = list(rows[0]["per_image"]) if rows else []
    head = ["timestep", "up_block", "ensemble", "noise_schedule", "pairs"] + [f"per image @{a}" for a in alphas] + [f"per point @{a}" for a in alphas]
    best = max(rows, key=lambda r: r["per_image"][key]) if rows else None
    geo_head, geo_cells = geo_aware_columns(rows, key)  # SPair-71k, AP-10K: the points a mirrored twin could take
    head += geo_head
    table = [[r["timestep"], r["up_block"], r["ensemble"], r["noise_schedule"], r["n_pairs"],
              *(f"{100 * r['per_image'][a]:.2f}" for a in alphas), *(f"{100 * r['per_point'][a]:.2f}" for a in alphas), *geo]
             for r, geo in zip(rows, geo_cells)]
    shown = [[f"**{v}**" for v in vals] if r is best else vals for r, vals in zip(rows, table)]
    lines = [f"# Sweep: {_split_words(cfg)}, prompt {cfg.prompt}, match {cfg.rule}, protocol {cfg.protocol}", "",
             f"PCK in %; the best cell by per-image PCK@{key} is in bold.", "", *markdown_table(head, shown)]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "table.csv", csv_text(head, table))


def _split_words(cfg: EvalConfig) -> str:
    """The data a sweep's cells read: ``dataset/split``, and its categories where some were chosen."""
    return f"{cfg.dataset}/{cfg.split}" + (f" ({', '.join(cfg.categories)})" if cfg.categories else "")


def plot_sweep(rows: Sequence[dict], out: Path, key: str, what: str = "") -> dict[str, dict]:
    """``pck_vs_t.png``: PCK@key against t, one line per layer (and ensemble / schedule where
    those differ), per image and per point; ``heatmap.png``: t x layer per (ensemble,
    schedule), on one colour scale, each panel's best cell marked. ``what`` (the data, pairs,
    prompt, rule and protocol) heads both pictures. Returns what each file shows: its title,
    (x label, y label) per panel, the legend (pck_vs_t) or each panel's title and colour range
    (heatmap)."""
    drawn: dict[str, dict] = {}
    plt = pyplot()
    import numpy as np

    combos = list(dict.fromkeys((r["ensemble"], r["noise_schedule"]) for r in rows))
    several_e, several_s = len({e for e, _ in combos}) > 1, len({s for _, s in combos}) > 1

    def setting(e, s) -> str:  # what tells the lines apart, and only that
        return "".join(([f", ensemble {e}"] if several_e else []) + ([f", {s}"] if several_s else []))
    n_lines = len(combos) * len({r["up_block"] for r in rows})
    ncol = min(4, n_lines)
    legend_rows = -(-n_lines // ncol)
    height = 4.2 + 0.25 * legend_rows + 0.3
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    fig.suptitle(what, fontsize=9)
    for ax, agg, label in ((axes[0], "per_image", "per image"), (axes[1], "per_point", "per point")):
        for (e, s), k in itertools.product(combos, sorted({r["up_block"] for r in rows})):
            pts = sorted((r["timestep"], 100 * r[agg][key]) for r in rows if (r["ensemble"], r["noise_schedule"], r["up_block"]) == (e, s, k))
            if pts:
                tag = f"up_blocks[{k}]" + setting(e, s)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=tag)
        ax.set_xlabel("timestep t")
        ax.set_title(f"PCK@{key}, {label}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"PCK@{key} (%)")
    # below both panels: a legend inside one would hide its points
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.15) / height, 1, 1))
    fig.savefig(out / "pck_vs_t.png", dpi=120)
    drawn["pck_vs_t.png"] = {"title": what, "labels": [(a.get_xlabel(), a.get_ylabel()) for a in axes], "legend": axes[0].get_legend_handles_labels()[1]}
    plt.close(fig)

    fig, axes = plt.subplots(1, len(combos), figsize=(max(5, 4.5 * len(combos)), 4.3), squeeze=False)
    fig.suptitle(what, fontsize=9)
    values = [100 * r["per_image"][key] for r in rows]
    lo, hi = min(values), max(values)  # one colour scale for every panel: equal colours are equal PCK
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    for ax, (e, s) in zip(axes[0], combos):
        sub = [r for r in rows if (r["ensemble"], r["noise_schedule"]) == (e, s)]
        ts, ks = sorted({r["timestep"] for r in sub}), sorted({r["up_block"] for r in sub})
        grid = np.full((len(ks), len(ts)), np.nan)
        for r in sub:
            grid[ks.index(r["up_block"]), ts.index(r["timestep"])] = 100 * r["per_image"][key]
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(ts)), [str(t) for t in ts], rotation=45 if len(ts) > 8 else 0)
        ax.set_yticks(range(len(ks)), [f"up_blocks[{k}]" for k in ks])
        ax.set_xlabel("timestep t")
        ax.set_ylabel("layer")
        for i in range(len(ks)):
            for j in range(len(ts)):
                if not np.isnan(grid[i, j]):
                    bright = grid[i, j] > lo + 0.6 * (hi - lo)
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7, color="black" if bright else "white")
        bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_title(f"PCK@{key} per image (%), ensemble {e}, {s}\nred: the best cell" + (" of this panel" if len(combos) > 1 else ""), fontsize=9)
        fig.colorbar(im, ax=ax, label=f"PCK@{key} (%)")
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=120)
    drawn["heatmap.png"] = {"title": what, "labels": [(a.get_xlabel(), a.get_ylabel()) for a in axes[0]], "panels": [a.get_title() for a in axes[0]],
                            "colour_ranges": [a.images[0].get_clim() for a in axes[0]]}
    plt.close(fig)
    return drawn
