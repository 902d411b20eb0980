"""``sd4match reproduce``: the paper's Table 1 from the authors' released prompts, in one command.

Given ``pretrained_prompts.zip`` (or its unzipped folder) and the dataset roots, it

1. finds every prompt by the folder names the official scripts write
   (``<Single|Class>_<data>_sd<version>_<TokenEmbeds75|HiddenState>/caption.pt``,
   ``CPM_<data>_sd<version>_<config>/ckpt.pt``; ``parse_official_name``) and imports each
   into ``<out>/prompts/<name>/`` (``prompts.official.import_official``);
2. evaluates each row of Table 1 it can: a prompt trained on SPair-71k on the SPair-71k test
   split, one trained on PF-Pascal on the PF-Pascal and PF-Willow test splits; at every
   timestep asked (50, the official test script's, and 261, the training one), ensemble 8,
   the four match rules from one extraction, the ``sd4match`` protocol (the official frame);
   each evaluation in ``<out>/runs/<name>/<test>-t<T>-<settings hash>/``;
3. writes ``table.md``, ``table.csv`` and ``table.png``: ours beside the published number,
   with the number's source, aggregation and threshold, and the difference.

A row already evaluated (its ``score.json`` exists) is read, not run again; an interrupted
one resumes at its first missing pair. A missing prompt or dataset is a row of the table
saying so, never an error. No model loads when nothing is left to run.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch.distributed as dist

from sd4match.checks import check_splits
from sd4match.config import MATCH_RULES, EvalConfig
from sd4match.data.records import limit_pairs, limit_record
from sd4match.errors import Sd4MatchError, first_line
from sd4match.evaluate import RUN, evaluate
from sd4match.fileio import atomic_path, atomic_write_text, csv_text, file_sha256, markdown_table
from sd4match.prompts import parse_prompt, read_prompt_config
from sd4match.prompts.official import OfficialName, import_official, official_file, parse_official_name
from sd4match.runtime import distributed_rank_world, locks_out
from sd4match.viz import pyplot

__all__ = ["OfficialPrompt", "PUBLISHED", "TABLE1_TESTS", "find_official_prompts", "parse_official_name", "reproduce"]

#: the test splits of Table 1 a prompt trained on each dataset is evaluated on
TABLE1_TESTS = {"spair": ("spair",), "pfpascal": ("pfpascal", "pfwillow")}
DATASET_LABELS = {"spair": "SPair-71k", "pfpascal": "PF-Pascal", "pfwillow": "PF-Willow"}
#: the threshold each test split's PCK uses in the paper (the official frame, ``sd4match`` protocol)
THRESHOLDS = {"spair": "target box, 768 frame", "pfpascal": "768 (the image)", "pfwillow": "keypoint extent, 768 frame"}


@dataclass(frozen=True)
class Published:
    """A published number: PCK in % per alpha, where it comes from, how it aggregates."""

    pck: dict[str, float]
    source: str
    aggregation: str = "per image"


_LISTING = "arXiv 2310.17569 as a public results listing quotes it (and a review quoting 75.5); not checked against the paper's Table 1"
#: Table 1's numbers a public source supports; every other row of Table 1 is "not found in a source".
#: Keys: (method, trained on, tested on); the setting of the official README's command (t = 50).
PUBLISHED: dict[tuple[str, str, str], Published] = {
    ("CPM", "spair", "spair"): Published({"0.05": 59.5, "0.1": 75.5}, _LISTING),
    ("CPM", "pfpascal", "pfpascal"): Published({"0.1": 95.2}, _LISTING),
    ("CPM", "pfpascal", "pfwillow"): Published({"0.1": 81.3}, _LISTING + "; listed as 'bbox' PCK"),
}
#: the paper's rows (method, trained on); HiddenState prompts found are added as extra rows
TABLE1_ROWS = [(m, t) for t in ("spair", "pfpascal") for m in ("Single", "Class", "CPM")]
PAPER_RULE, PAPER_T = "kernel-softargmax", 50


@dataclass(frozen=True)
class OfficialPrompt:
    """A released prompt found by its official folder name."""

    name: str  # the official folder name
    spec: OfficialName  # what the name says
    file: Path

    method = property(lambda self: self.spec.method)
    train = property(lambda self: self.spec.train)
    kind = property(lambda self: self.spec.kind)

    @property
    def label(self) -> str:
        return self.method + ("-HiddenState" if self.spec.hidden else "")


def find_official_prompts(source: str | Path, workdir: str | Path) -> tuple[list[OfficialPrompt], list[str]]:
    """The released prompts in ``source`` (the zip, or a folder holding the unzipped one), and
    notes on what was passed over. A zip's prompt files are extracted into ``workdir`` under
    their official folder names only (no member path is trusted)."""
    source, workdir = Path(source), Path(workdir)
    found: dict[str, OfficialPrompt] = {}
    notes: list[str] = []
    if source.is_file():
        try:
            zf = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as e:
            raise Sd4MatchError(f"{source}: not a readable zip ({first_line(e)})") from None
        with zf:
            for info in zf.infolist():
                parts = [p for p in info.filename.replace("\\", "/").split("/") if p]
                if len(parts) < 2 or parts[0] == "__MACOSX" or info.is_dir():
                    continue
                parsed = parse_official_name(parts[-2])
                if parsed is None or parts[-1] != official_file(parsed.kind):
                    continue
                dest = workdir / parts[-2] / parts[-1]
                if not dest.is_file() or dest.stat().st_size != info.file_size:
                    try:
                        data = zf.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError) as e:
                        notes.append(f"{source}:{info.filename}: unreadable ({first_line(e)})")
                        continue
                    with atomic_path(dest) as tmp:  # a temporary name of this process: the processes of torchrun all extract
                        tmp.write_bytes(data)
                found[parts[-2]] = OfficialPrompt(parts[-2], parsed, dest)
    elif source.is_dir():
        for f in sorted([*source.rglob("caption.pt"), *source.rglob("ckpt.pt")]):
            parsed = parse_official_name(f.parent.name)
            if parsed is None or f.name != official_file(parsed.kind):
                notes.append(f"{f}: not in a folder named as the official scripts name them; passed over")
                continue
            found.setdefault(f.parent.name, OfficialPrompt(f.parent.name, parsed, f))
    else:
        raise Sd4MatchError(f"{source}: no such zip or folder (the authors' pretrained_prompts.zip, or its unzipped folder)")
    return sorted(found.values(), key=lambda p: (p.train, ["Single", "Class", "CPM"].index(p.method), p.spec.hidden)), notes


@dataclass
class Row:
    """One line of the table: a (prompt, test split, timestep, rule) and what came of it."""

    method: str
    train: str
    test: str
    timestep: int | None = None
    rule: str | None = None
    per_image: dict[str, float] = field(default_factory=dict)
    per_point: dict[str, float] = field(default_factory=dict)
    n_pairs: int | None = None
    status: str = ""
    run: str = ""
    prompt: str = ""

    @property
    def published(self) -> Published | None:
        if self.timestep == PAPER_T and self.rule == PAPER_RULE:
            return PUBLISHED.get((self.method, self.train, self.test))
        return None


def _settings_tag(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


@locks_out("reproduction")
def reproduce(source: str | Path, roots: dict[str, str | Path | None], out: str | Path, *, load_model: Callable[[], object],
              load_dino: Callable[[], object], model_settings: dict, timesteps: Sequence[int] = (50, 261), ensemble: int = 8, limit: int = 0,
              dino_name: str = "dinov2-b", dino_dim: int | None = None, progress: bool = True) -> dict:
    """Import the released prompts in ``source``, evaluate every Table-1 row the data allows,
    and write ``table.md``, ``table.csv`` and ``table.png`` into ``out``.

    Args:
        roots: dataset name (spair, pfpascal, pfwillow) -> its root, or None when absent.
        load_model: makes the SD featurizer (called once, and only when a row must run).
        load_dino: makes the DINOv2 featurizer for CPM prompts (likewise).
        model_settings: what identifies the model (its name, dtype, ...): part of each run
            folder's name, so other settings never reuse a row.
        limit: only N pairs of each test split, each category its share (``limit_pairs``; a quick look).

    Returns:
        ``{"rows": [...], "ran": evaluations run now, "reused": rows read from earlier runs,
        "missing": [...], "notes": [...]}``.
    """
    out = Path(out)
    rank, world = distributed_rank_world()
    made: dict[str, object] = {}

    def get(name: str, loader: Callable[[], object]):  # each model loaded once, and only when a step needs it
        if name not in made:
            made[name] = loader()
        return made[name]

    prompts, notes = find_official_prompts(source, out / "official")
    # 1. the data, checked before any model loads: a missing or broken root is a note, not an error
    records, missing = {}, []
    for ds in ("spair", "pfpascal", "pfwillow"):
        root = roots.get(ds)
        if root is None:
            missing.append(f"{DATASET_LABELS[ds]}: no root given (--{ds})")
            continue
        try:
            recs = check_splits(ds, root, ["test"])["test"]
        except Sd4MatchError as e:
            missing.append(f"{DATASET_LABELS[ds]}: {first_line(e)}")
            continue
        records[ds] = limit_pairs(recs, limit)
    # 2. the prompts, imported once (by the first process)
    folders: dict[str, Path] = {}
    for p in prompts:
        dest = out / "prompts" / p.name
        if rank == 0 and not _imported(dest, p.file):
            feat = get("model", load_model)
            import_official(p.file, p.kind, feat, dest, dino=dino_name, dino_dim=dino_dim)
        folders[p.name] = dest
    if world > 1:
        dist.barrier()
    # 3. the rows
    rows: list[Row] = []
    weights: dict[str, str] = {}  # the hub snapshots the rows' weights came from, as their score.json record them
    ran = reused = 0
    by_key = {(p.method, p.train): p for p in prompts if not p.spec.hidden}
    plan = [(m, t, by_key.get((m, t))) for m, t in TABLE1_ROWS] + [(p.label, p.train, p) for p in prompts if p.spec.hidden]
    for method, train, p in plan:
        for test in TABLE1_TESTS.get(train, (train,)):
            if p is None:
                rows.append(Row(method, train, test, status=f"prompt not found in {Path(source).name}"))
                continue
            if test not in records:
                rows.append(Row(method, train, test, status="dataset missing", prompt=p.name))
                continue
            for t in timesteps:
                settings = {**model_settings, "timestep": t, "ensemble": ensemble, "limit": limit, "dino": dino_name,
                            "prompt_sha256": file_sha256(p.file), **limit_record(limit)}
                run = out / "runs" / p.name / f"{test}-t{t}-{_settings_tag(settings)}"
                score_file = run / "score.json"
                if score_file.is_file():
                    doc = json.loads(score_file.read_text())
                    reused += 1
                else:
                    feat = get("model", load_model)
                    feat.reconfigure(timestep=t, ensemble=ensemble)
                    dino = get("dino", load_dino) if parse_prompt(str(folders[p.name])).needs_dino else None
                    cfg = EvalConfig(dataset=test, root=str(roots[test]), split="test", prompt=str(folders[p.name]), rule="all",
                                     protocol="sd4match", limit=limit)
                    ev = evaluate(feat, cfg, run, dino=dino, progress=progress, records=records[test], resume=(run / RUN).is_file(),
                                  request=settings)
                    ran += 1
                    if rank != 0:
                        continue
                    doc = ev.score
                weights.update(doc.get("run", {}).get("weights") or {})
                for rule in MATCH_RULES:
                    res = doc["by_rule"][rule]
                    rows.append(Row(method, train, test, t, rule, {k: 100 * v for k, v in res["per_image"]["all"].items()},
                                    {k: 100 * v for k, v in res["per_point"]["all"].items()}, res["n_pairs"], "ok", str(run.relative_to(out)), p.name))
    summary = {"rows": [r.__dict__ for r in rows], "ran": ran, "reused": reused, "missing": missing, "notes": notes,
               "prompts": [p.name for p in prompts], "limit": limit, "model": model_settings.get("model"), "weights": weights}
    if rank == 0:
        write_table(rows, out, missing=missing, notes=notes, limit=limit, model=model_settings.get("model"), weights=weights)
        atomic_write_text(out / "reproduce.json", json.dumps(summary, indent=2))
    return summary


def _imported(dest: Path, file: Path) -> bool:
    """Whether ``dest`` already holds ``file`` imported (its SHA-256 recorded there)."""
    try:
        cfg = read_prompt_config(dest)
    except Sd4MatchError:
        return False
    return (cfg.training.get("imported_from") or {}).get("sha256") == file_sha256(file)


# ------------------------------------------------------------------------------ the table
COLUMNS = ["method", "trained on", "test", "t", "rule", "PCK@0.05", "PCK@0.1", "PCK@0.15", "per point @0.1", "pairs", "published @0.05",
           "published @0.1", "difference @0.1", "source of the published number", "status"]


def _fmt(v) -> str:
    return "" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _cells(r: Row) -> list:
    pub = r.published
    ours = r.per_image.get("0.1")
    diff = None if pub is None or "0.1" not in pub.pck or ours is None else ours - pub.pck["0.1"]
    source = (f"{pub.source} ({pub.aggregation}, threshold: {THRESHOLDS[r.test]})" if pub is not None else
              "not found in a source" if r.status == "ok" and r.timestep == PAPER_T and r.rule == PAPER_RULE else "")
    return [r.method, DATASET_LABELS.get(r.train, r.train), DATASET_LABELS.get(r.test, r.test), r.timestep, r.rule, r.per_image.get("0.05"), ours,
            r.per_image.get("0.15"), r.per_point.get("0.1"), r.n_pairs, None if pub is None else pub.pck.get("0.05"),
            None if pub is None else pub.pck.get("0.1"), diff, source, r.status]


def write_table(rows: Sequence[Row], out: Path, *, missing: Sequence[str] = (), notes: Sequence[str] = (), limit: int = 0, model: str | None = None,
                weights: dict[str, str] | None = None) -> None:
    """``table.md``, ``table.csv`` and ``table.png`` of the rows; ``model`` and the hub
    snapshots of its ``weights`` (model id -> commit) named under the title."""
    lines = ["# SD4Match Table 1, reproduced", "",
             "PCK in %, per image (the mean over pairs of each pair's PCK) unless a column says per point; protocol `sd4match` "
             "(the official code's 768 x 768 frame). Ensemble 8, the four match rules from one feature extraction. "
             f"Published numbers sit on the rows of the official README's setting (t = {PAPER_T}, {PAPER_RULE})."]
    if model:
        lines += ["", f"Model: `{model}`" + ("; weights from the hub snapshots " + ", ".join(f"`{m}@{c}`" for m, c in sorted(weights.items()))
                                            if weights else "") + "."]
    if limit:
        lines += ["", f"**Only {limit} pairs of each test split (`--limit`: each category its share, its first pairs): "
                      "not comparable with the published numbers.**"]
    table = [[_fmt(c) for c in _cells(r)] for r in rows]
    lines += ["", *markdown_table(COLUMNS, table)]
    if missing:
        lines += ["", "Missing data:"] + [f"- {m}" for m in missing]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "table.csv", csv_text(COLUMNS, table))
    plot_table(rows, out / "table.png", limit=limit)


def plot_table(rows: Sequence[Row], path: Path, *, limit: int = 0) -> Path:
    """PCK@0.1 per image of each (method, test) at each timestep (the paper's rule), beside
    the published number where one exists (a row without one says so); a ``--limit`` run's
    picture says it is not comparable."""
    plt = pyplot()

    done = [r for r in rows if r.status == "ok" and r.rule == PAPER_RULE]
    groups = list(dict.fromkeys((r.method, r.train, r.test) for r in done))
    ts = sorted({r.timestep for r in done})
    series = [(f"ours, t = {t}", {(r.method, r.train, r.test): r.per_image.get("0.1") for r in done if r.timestep == t}) for t in ts]
    series.append(("published", {k: PUBLISHED[k].pck.get("0.1") for k in groups if k in PUBLISHED}))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) + 2), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, g in enumerate(groups) if vals.get(g) is not None]
        ys = [vals[g] for g in groups if vals.get(g) is not None]
        bars = ax.bar(xs, ys, width, label=label, color="0.6" if label == "published" else None)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    published = series[-1][1]
    ax.set_xticks(range(len(groups)), [f"{m}\n{DATASET_LABELS[tr]} → {DATASET_LABELS[te]}" + ("" if published.get((m, tr, te)) is not None else "\n(no published number)")
                                       for m, tr, te in groups], fontsize=8)
    ax.set_ylabel("PCK@0.1, % (per image)")
    ax.set_ylim(0, 118)
    ax.set_title(("SD4Match Table 1: ours beside the published numbers" if groups else "SD4Match Table 1: no row could be run")
                 + f"\n{PAPER_RULE}, sd4match protocol (768 frame); grey: published"
                 + (f"\nONLY {limit} PAIRS of each test split (--limit): not comparable with the published numbers" if limit else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=len(series), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
