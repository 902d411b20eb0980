"""``sd4match compare``: accuracy beside cost for several evaluated runs, in one table.

Each argument is an ``evaluate`` output folder (its ``score.json``); what training the
prompt and adapter cost (trainable parameters, seconds per step, peak memory) comes from
the prompt folder's record, copied into ``score.json`` (``run.training_cost``). Writes
``compare.md``, ``compare.csv`` and ``compare.png`` (PCK@0.1 per image against trainable
parameters, one bar per run), and ``compare.tex``: the per-category table papers print
(also in ``compare.md``), as LaTeX.

Given the dataset's ``root``, each run's predictions are scored again pair by pair, and the
table gets each run's 95% confidence interval and its difference from the first run with a
paired one (a bootstrap over the pairs: the runs share every resample), so a difference
within the noise of the split's pairs reads as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from sd4match.config import MATCH_RULES
from sd4match.data import open_dataset
from sd4match.data.records import select_pairs
from sd4match.errors import Sd4MatchError, first_line
from sd4match.evaluate import predictions_file
from sd4match.fileio import atomic_write_text, csv_text, markdown_table, staged_dir
from sd4match.metrics import geo_aware_all, geo_aware_columns, load_predictions, score
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
        return {"run": folder.name, "path": str(folder), "prompt": prompt, "rule": run.get("config", {}).get("rule"), "config": run.get("config", {}),
                "resolution": doc.get("resolution"),
                "dataset": f"{doc['dataset']}/{doc['split']}", "protocol": doc["protocol"], "n_pairs": doc["n_pairs"],
                "limit": run.get("config", {}).get("limit") or 0, "limit_pairs": run.get("config", {}).get("limit_pairs"),
                "categories": run.get("config", {}).get("categories") or [],
                "cost": run.get("training_cost") or (ZERO_SHOT if isinstance(prompt, str) and is_keyword_prompt(prompt) else {}),
                "per_image": doc["per_image"]["all"], "per_point": doc["per_point"]["all"],
                "by_category": {agg: {"categories": doc[agg].get("by_category") or {}, "mean": doc[agg].get("category_mean")}
                                for agg in ("per_image", "per_point")},
                "geo_aware": geo_aware_all(doc)}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise Sd4MatchError(f"{f}: not the score.json of an evaluation ({first_line(e)})") from None


#: the cost of a run whose prompt was never trained (empty, text): nothing learned
ZERO_SHOT = {"adapt": "none (zero-shot)", "trainable_params": 0}


#: bootstrap resamples of the pairs, and their seed: the intervals are the same on every run of `compare`
RESAMPLES, SEED = 2000, 0


def compare(folders: Sequence[str | Path], out: str | Path | None = None, *, root: str | Path | None = None, images: str | Path | None = None) -> dict:
    """The comparison of ``folders``; with ``out``, also its markdown, CSV and plot; with the
    dataset's ``root`` (and ``images`` for SPair-U), confidence intervals (``intervals``)."""
    seen: dict[Path, str] = {}
    for f in folders:
        if Path(f).resolve() in seen:
            raise Sd4MatchError(f"{f}: given twice (as {seen[Path(f).resolve()]}); name each evaluation once")
        seen[Path(f).resolve()] = str(f)
    rows = [read_run(f) for f in folders]
    for r, name in zip(rows, run_names([r["path"] for r in rows])):
        r["run"] = name
    if len({(r["dataset"], r["protocol"]) for r in rows}) > 1:
        raise Sd4MatchError("the runs were scored on different splits or protocols: "
                            + "; ".join(f"{r['run']}: {r['dataset']} ({r['protocol']})" for r in rows))
    if len({(r["n_pairs"], r["limit"], r["limit_pairs"] if r["limit"] else None, tuple(r["categories"])) for r in rows}) > 1:  # a --limit run beside a full one
        raise Sd4MatchError("the runs were scored on different pairs: "
                            + "; ".join(f"{r['run']}: {r['n_pairs']} pairs" + (f" (--limit {r['limit']}" + ("" if r["limit_pairs"] else ", the first pairs: an earlier sd4match's")
                                                                               + ")" if r["limit"] else "")
                                        + (f" (--categories {','.join(r['categories'])})" if r["categories"] else "") for r in rows)
                            + "; compare evaluations of the same pairs")
    alphas = [a for a in rows[0]["per_image"] if all(a in r["per_image"] for r in rows)]
    if not alphas:
        raise Sd4MatchError("the runs share no PCK threshold: " + "; ".join(f"{r['run']}: {', '.join(r['per_image'])}" for r in rows))
    head = ["run", "prompt", "adapt", "trainable params", "s/step", "peak MB"] + [f"per image @{a}" for a in alphas] + [f"per point @{a}" for a in alphas]
    key = "0.1" if "0.1" in alphas else alphas[0]
    geo_head, geo_cells = geo_aware_columns(rows, key)  # SPair-71k, AP-10K: the points a mirrored twin could take
    head += geo_head
    intervals = pair_intervals(rows, key, root, images) if root is not None else None
    if intervals is not None:
        head += [f"per image @{key} 95% CI", f"difference from {rows[0]['run']} @{key} (95% CI)"]

    def cells(i, r):
        c = r["cost"]
        row = [r["run"], r["prompt"] or "-", c.get("adapt", "-"), c.get("trainable_params", "-"),
               f"{c['seconds_per_step']:.3f}" if "seconds_per_step" in c else "-", f"{c['peak_memory_mb']:.0f}" if "peak_memory_mb" in c else "-",
               *(f"{100 * r['per_image'][a]:.2f}" for a in alphas), *(f"{100 * r['per_point'][a]:.2f}" for a in alphas)]
        row += geo_cells[i]
        if intervals is not None:
            lo, hi = intervals["ci"][i]
            d, (dlo, dhi) = intervals["difference"][i], intervals["difference_ci"][i]
            row += [f"[{100 * lo:.2f}, {100 * hi:.2f}]", "(reference)" if i == 0 else f"{100 * d:+.2f} [{100 * dlo:+.2f}, {100 * dhi:+.2f}]"]
        return row

    table = [cells(i, r) for i, r in enumerate(rows)]
    md = [f"# Comparison: {rows[0]['dataset']}, protocol {rows[0]['protocol']}, {rows[0]['n_pairs']} pairs (PCK in %)", "", *markdown_table(head, table)]
    if intervals is not None:
        md += ["", f"95% confidence intervals of PCK@{key} per image: a bootstrap over the {intervals['n_pairs']:,} pairs with keypoints "
                   f"({RESAMPLES:,} resamples, seed {SEED}), paired for the differences (every run scored on the same resampled pairs). "
                   "A difference whose interval holds 0 is within the noise of this split's pairs."]
    else:
        md += ["", "With the dataset's --root, the table also gives 95% confidence intervals and paired differences."]
    by_category = category_tables(rows, key)
    for agg, words in AGGREGATIONS.items():
        md += ["", f"## PCK@{key} {words} by category (%; the best of each column in bold)", "", *by_category[agg]["markdown"]]
    title = f"{rows[0]['dataset']}, protocol {rows[0]['protocol']}, {rows[0]['n_pairs']} pairs"
    latex = "\n".join(f"% sd4match compare: {title}; PCK@{key} {words} by category (%), the best of each column in bold\n"
                      + by_category[agg]["latex"] for agg, words in AGGREGATIONS.items())
    result = {"rows": rows, "intervals": intervals, "markdown": "\n".join(md) + "\n", "csv": csv_text(head, table), "latex": latex}
    if out is not None:
        with staged_dir(out) as tmp:  # the four files together, or the folder as it was
            atomic_write_text(tmp / "compare.md", result["markdown"])
            atomic_write_text(tmp / "compare.csv", result["csv"])
            atomic_write_text(tmp / "compare.tex", result["latex"])
            plot_compare(rows, tmp / "compare.png", intervals)
    return result


#: score.json's two aggregations, as the tables name them
AGGREGATIONS = {"per_image": "per image", "per_point": "per point"}


def category_tables(rows: Sequence[dict], key: str) -> dict:
    """PCK@``key`` of each run (a row) in each category, then the mean of the categories and
    all pairs (columns), as papers print their per-category tables: per aggregation, the
    markdown lines and a LaTeX ``tabular`` (booktabs), the best of each column in bold (every
    run that ties it)."""
    categories = list(rows[0]["by_category"]["per_image"]["categories"])
    out = {}
    for agg in AGGREGATIONS:
        head = [*categories, "mean of categories", "all"]
        values = []
        for r in rows:
            block = r["by_category"][agg]
            values.append([(block["categories"].get(c) or {}).get(key) for c in categories]
                          + [(block["mean"] or {}).get(key), r[agg].get(key)])
        best = [{d: max((round(100 * v[j], d) for v in values if v[j] is not None), default=None) for d in (1, 2)} for j in range(len(head))]

        def cells(vals, digits: int, bold) -> list[str]:  # the best as printed: values that print alike tie
            shown = [None if v is None else round(100 * v, digits) for v in vals]
            return ["-" if v is None else bold(f"{v:.{digits}f}") if v == best[j][digits] else f"{v:.{digits}f}" for j, v in enumerate(shown)]

        md = markdown_table(["run", *head], [[r["run"], *cells(vals, 2, lambda t: f"**{t}**")] for r, vals in zip(rows, values)])
        tex = ["\\begin{tabular}{l" + "c" * len(head) + "}", "\\toprule",
               " & ".join(["Run", *(latex_text(h) for h in [*categories, "Mean", "All"])]) + " \\\\", "\\midrule"]
        tex += [" & ".join([latex_text(r["run"]), *cells(vals, 1, lambda t: f"\\textbf{{{t}}}")]) + " \\\\" for r, vals in zip(rows, values)]
        tex += ["\\bottomrule", "\\end{tabular}", ""]
        out[agg] = {"markdown": md, "latex": "\n".join(tex)}
    return out


def latex_text(text: str) -> str:
    """``text`` as LaTeX prints it (its special characters escaped)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
               "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in str(text))


def pair_intervals(rows: Sequence[dict], key: str, root: str | Path, images: str | Path | None = None) -> dict:
    """Each run's predictions scored again pair by pair on the split's records at ``root``
    (the run's --limit applied): PCK@``key`` per image of every pair with keypoints; then
    each run's bootstrap 95% interval and its paired difference from the first run.

    Returns ``{"n_pairs", "pck": [per run], "ci": [(lo, hi)], "difference": [...], "difference_ci": [(lo, hi)]}``
    (fractions, not %)."""
    cfg = rows[0]["config"]
    options = {"images": images, "all_pairs": cfg.get("all_pairs")}
    every, limit = open_dataset(cfg["dataset"], root, **options).pairs(cfg["split"]), int(cfg.get("limit") or 0)
    if cfg.get("limit_pairs") or not limit:
        records = select_pairs(every, limit=limit, categories=cfg.get("categories") or ())
    else:
        records = every[:limit]  # an earlier sd4match's --limit: the first N
    per_run = []
    for r in rows:
        several = r["rule"] == "all"  # then the table's numbers are the first rule's (score.json's top level)
        f = Path(r["path"]) / predictions_file(MATCH_RULES[0] if several else r["rule"], several)
        if not f.is_file():
            raise Sd4MatchError(f"{r['path']}: holds no {f.name}, so its pairs cannot be scored one by one for the intervals")
        again = f"give --root the dataset the run was evaluated on (or {f.name} was changed)"
        try:
            res = score(records, load_predictions(f), protocol=r["protocol"], alphas=[float(key)], resolution=r["resolution"] or 768,
                        allow_missing=True, where=str(f), per_pair=True)
        except Sd4MatchError as e:
            raise Sd4MatchError(f"{first_line(e)}: {again}") from None
        if abs(res["per_image"]["all"][key] - r["per_image"][key]) > 1e-9:
            raise Sd4MatchError(f"{f}: scored on {root} it gives PCK@{key} {100 * res['per_image']['all'][key]:.2f}, its score.json "
                                f"{100 * r['per_image'][key]:.2f}: {again}")
        per_run.append(res["per_pair"])
    ids = list(per_run[0])
    v = np.array([[p[i][0] for i in ids] for p in per_run])  # (runs, pairs)
    rng = np.random.default_rng(SEED)
    means = np.concatenate([v[:, rng.integers(0, len(ids), size=(chunk, len(ids)))].mean(axis=2)
                            for chunk in np.diff(np.r_[0:RESAMPLES:100, RESAMPLES])], axis=1)  # (runs, resamples); 100 resamples at a time
    diffs = means - means[:1]
    pct = [2.5, 97.5]
    return {"n_pairs": len(ids), "pck": v.mean(axis=1).tolist(), "ci": [tuple(np.percentile(m, pct)) for m in means],
            "difference": (v.mean(axis=1) - v[0].mean()).tolist(), "difference_ci": [tuple(np.percentile(d, pct)) for d in diffs]}


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


def plot_compare(rows: Sequence[dict], path: Path, intervals: dict | None = None) -> Path:
    plt = pyplot()

    key = "0.1" if "0.1" in rows[0]["per_image"] else next(iter(rows[0]["per_image"]))
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["cost"].get("trainable_params") or 0))
    heights = [100 * rows[i]["per_image"][key] for i in order]
    yerr = None
    if intervals is not None:  # the 95% interval of each bar
        yerr = np.array([[h - 100 * intervals["ci"][i][0], 100 * intervals["ci"][i][1] - h] for h, i in zip(heights, order)]).T
    order = [rows[i] for i in order]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(order) + 2), 4.2))
    bars = ax.bar(range(len(order)), heights, color="tab:blue", yerr=yerr, capsize=4 if yerr is not None else 0, ecolor="0.25")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(order)), [f"{r['run']}\n{r['cost'].get('trainable_params', '?'):,} params" if isinstance(r["cost"].get("trainable_params"), int)
                                      else f"{r['run']}\n? params" for r in order], fontsize=8)
    ax.set_xlabel("run (trainable parameters, fewest first)")
    ax.set_ylabel(f"PCK@{key} per image (%)" + (", 95% CI" if intervals is not None else ""))
    ax.set_title(f"Accuracy against trainable parameters\n{rows[0]['dataset']} ({rows[0]['n_pairs']:,} pairs), {rows[0]['protocol']} protocol", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
