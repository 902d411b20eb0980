"""``sd4match compare``: accuracy beside cost for several evaluated runs, in one table.

Each argument is an ``evaluate`` output folder (its ``score.json``); what training the
prompt and adapter cost (trainable parameters, seconds per step, peak memory) comes from
the prompt folder's record, copied into ``score.json`` (``run.training_cost``). Writes
``compare.md``, ``compare.csv`` and ``compare.png`` (PCK@0.1 per image against trainable
parameters, one bar per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sd4match.errors import Sd4MatchError, first_line
from sd4match.fileio import atomic_write_text, csv_text, markdown_table
from sd4match.prompts.spec import is_keyword_prompt
from sd4match.viz import pyplot

__all__ = ["compare", "read_run"]


def read_run(folder: str | Path) -> dict:
    """One row: the run's name, prompt, adaptation, cost and PCK (per image and per point)."""
    folder = Path(folder)
    f = folder / "score.json"
    if not folder.is_dir():
        raise Sd4MatchError(f"{folder}: no such folder")
    if not f.is_file():
        raise Sd4MatchError(f"{folder}: holds no score.json (not a finished evaluation: `sd4match evaluate --out` writes one, `--resume` finishes one)")
    try:
        doc = json.loads(f.read_text())
        run = doc.get("run", {})
        prompt = run.get("config", {}).get("prompt")
        return {"run": folder.name, "path": str(folder), "prompt": prompt, "rule": run.get("config", {}).get("rule"),
                "dataset": f"{doc['dataset']}/{doc['split']}", "protocol": doc["protocol"], "n_pairs": doc["n_pairs"],
                "limit": run.get("config", {}).get("limit") or 0, "limit_pairs": run.get("config", {}).get("limit_pairs"),
                "cost": run.get("training_cost") or (ZERO_SHOT if isinstance(prompt, str) and is_keyword_prompt(prompt) else {}),
                "per_image": doc["per_image"]["all"], "per_point": doc["per_point"]["all"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise Sd4MatchError(f"{f}: not the score.json of an evaluation ({first_line(e)})") from None


#: the cost of a run whose prompt was never trained (empty, text): nothing learned
ZERO_SHOT = {"adapt": "none (zero-shot)", "trainable_params": 0}


def compare(folders: Sequence[str | Path], out: str | Path | None = None) -> dict:
    """The comparison of ``folders``; with ``out``, also its markdown, CSV and plot."""
    rows = [read_run(f) for f in folders]
    for r, name in zip(rows, run_names([r["path"] for r in rows])):
        r["run"] = name
    if len({(r["dataset"], r["protocol"]) for r in rows}) > 1:
        raise Sd4MatchError("the runs were scored on different splits or protocols: "
                            + "; ".join(f"{r['run']}: {r['dataset']} ({r['protocol']})" for r in rows))
    if len({(r["n_pairs"], r["limit"], r["limit_pairs"] if r["limit"] else None) for r in rows}) > 1:  # a --limit run beside a full one
        raise Sd4MatchError("the runs were scored on different pairs: "
                            + "; ".join(f"{r['run']}: {r['n_pairs']} pairs" + (f" (--limit {r['limit']}" + ("" if r["limit_pairs"] else ", the first pairs: an earlier sd4match's")
                                                                               + ")" if r["limit"] else "") for r in rows)
                            + "; compare evaluations of the same pairs")
    alphas = [a for a in rows[0]["per_image"] if all(a in r["per_image"] for r in rows)]
    if not alphas:
        raise Sd4MatchError("the runs share no PCK threshold: " + "; ".join(f"{r['run']}: {', '.join(r['per_image'])}" for r in rows))
    head = ["run", "prompt", "adapt", "trainable params", "s/step", "peak MB"] + [f"per image @{a}" for a in alphas] + [f"per point @{a}" for a in alphas]

    def cells(r):
        c = r["cost"]
        return [r["run"], r["prompt"], c.get("adapt", "-"), c.get("trainable_params", "-"),
                f"{c['seconds_per_step']:.3f}" if "seconds_per_step" in c else "-", f"{c['peak_memory_mb']:.0f}" if "peak_memory_mb" in c else "-",
                *(f"{100 * r['per_image'][a]:.2f}" for a in alphas), *(f"{100 * r['per_point'][a]:.2f}" for a in alphas)]

    table = [cells(r) for r in rows]
    md = [f"# Comparison: {rows[0]['dataset']}, protocol {rows[0]['protocol']}, {rows[0]['n_pairs']} pairs (PCK in %)", "", *markdown_table(head, table)]
    result = {"rows": rows, "markdown": "\n".join(md) + "\n", "csv": csv_text(head, table)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.md", result["markdown"])
        atomic_write_text(out / "compare.csv", result["csv"])
        plot_compare(rows, out / "compare.png")
    return result


def run_names(paths: Sequence[str | Path]) -> list[str]:
    """Each folder's shortest trailing part of its path that no other folder shares:
    ``runs/lora/test`` and ``runs/prompt/test`` are ``lora/test`` and ``prompt/test``, not
    ``test`` twice."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, ps in enumerate(parts):
        k = 1
        while k < len(ps) and any(j != i and qs[-k:] == ps[-k:] for j, qs in enumerate(parts)):
            k += 1
        names.append("/".join(ps[-k:]))
    return names


def plot_compare(rows: Sequence[dict], path: Path) -> Path:
    plt = pyplot()

    key = "0.1" if "0.1" in rows[0]["per_image"] else next(iter(rows[0]["per_image"]))
    order = sorted(rows, key=lambda r: (r["cost"].get("trainable_params") or 0))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(order) + 2), 4.2))
    bars = ax.bar(range(len(order)), [100 * r["per_image"][key] for r in order], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(order)), [f"{r['run']}\n{r['cost'].get('trainable_params', '?'):,} params" if isinstance(r["cost"].get("trainable_params"), int)
                                      else f"{r['run']}\n? params" for r in order], fontsize=8)
    ax.set_xlabel("run (trainable parameters, fewest first)")
    ax.set_ylabel(f"PCK@{key} per image (%)")
    ax.set_title(f"Accuracy against trainable parameters\n{rows[0]['dataset']} ({rows[0]['n_pairs']:,} pairs), {rows[0]['protocol']} protocol", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
