"""``sd4match evaluate``: predict every pair of a split, write predictions and PCK.

The pipeline keeps the GPU fed: loader threads decode and squash the pictures of the
coming pairs (``batching.prefetch``); pairs are taken in chunks; a pair-independent prompt
(empty, text, single, category) gets each picture's features once, ``max_batch //
ensemble`` pictures a UNet call, kept in the store; a CPM prompt is built per pair, and
``max_batch // (2 x ensemble)`` pairs share a UNet call, the VAE posteriors and DINOv2
tokens coming from the store. Every picture's random draws are seeded by its content and
every call has a fixed size, so the predictions equal a one-pair-at-a-time run, a sharded
run and a resumed run, bit for bit.

``--match all`` matches each pair with the four rules from the same feature maps and keeps
each rule's predictions (``predictions.<rule>.jsonl``) and score (``score.json``'s
``by_rule``; its top level is the paper's rule, kernel-softargmax).

Nothing done is lost: predictions are appended and flushed pair by pair to
``predictions.partial.jsonl`` (one file per process) next to ``run.json`` (the settings);
``--resume`` continues at the first missing pair when the settings match. Only a finished
run writes ``predictions.jsonl`` and ``score.json`` (through temporary names), so an
earlier run's results stay as they were until the new ones are complete.
"""

from __future__ import annotations

import json
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from sd4match.batching import Batcher
from sd4match.config import EVAL_PRESETS, EvalConfig, MatchConfig, as_dict
from sd4match.data import DATASETS, dataset_options, open_dataset
from sd4match.data.records import PairRecord, limit_record, limit_rule_changed, select_pairs
from sd4match.errors import DataError, Sd4MatchError, Sd4MatchWarning, first_line
from sd4match.features.registry import weights_revision
from sd4match.features.sd import SDLayerStack
from sd4match.fileio import atomic_write_text
from sd4match.matching import match_pixels
from sd4match.metrics import format_table, label_score, score, seen_unseen, write_predictions
from sd4match.prompts import Prompt, resolve_prompt
from sd4match.runtime import distributed_rank_world, gather_dicts, git_sha, hang_for_tests, locks_out
from sd4match.store import Store

__all__ = ["EVAL_PRESETS", "EvalConfig", "Evaluation", "check_evaluation_folder", "evaluate", "predict_pairs", "print_score", "read_partial",
           "resolve_prompt"]

PARTIAL = "predictions.partial.jsonl"
RUN = "run.json"
RUN_INFO = "run-info.json"  # where and how a finished run went (root, loader threads, processes, seconds): not part of the result
_WHERE = ("root", "workers", "chunk", "pending")
#: settings that may differ between a run and its resumption
_VOLATILE = ("workers", "chunk", "pending", "skip_bad", "preset")


def predict_pairs(featurizer, prompt: Prompt | None, records: Sequence[PairRecord], root, *, match: MatchConfig | Sequence[MatchConfig] = MatchConfig(),
                  seed: int = 0, workers: int = 4, chunk: int = 32, pending: int = 64, dino=None, store: Store | None = None, batcher: Batcher | None = None,
                  progress: bool = True) -> Iterator[tuple[str, np.ndarray | dict[str, np.ndarray] | BaseException]]:
    """Yield (pair id, predicted target points in original pixels) for ``records``, in order;
    with several match configs, (pair id, {rule: points}) from the same feature maps.

    Pairs stream through ``Batcher.stream``: loader threads decode up to ``2 x chunk`` pairs
    ahead; each model call is full but the last. A pair whose pictures cannot be read yields
    its ``DataError`` instead of points.

    Args:
        match: the match rule and its settings, or a sequence of them.
        seed: base seed of every picture's random draws (ignored when ``batcher`` is given).
        pending: decoded pictures the pairs waiting for their maps may hold (``Batcher.stream``).
        dino, store: for a new ``Batcher`` (or give ``batcher``, e.g. to share its store).
    """
    batcher = batcher or Batcher(featurizer, dino=dino, store=store, seed=seed)

    several = not isinstance(match, MatchConfig)
    matches = tuple(match) if several else (match,)

    def predict(r: PairRecord, fs, ft):
        got = _match_rules(featurizer, matches, r, fs, ft)
        return got if several else got[matches[0].rule]

    yield from _stream(batcher, prompt, records, root, predict, workers=workers, chunk=chunk, pending=pending, progress=progress)


def _match_rules(cells, matches: Sequence[MatchConfig], r: PairRecord, fs, ft) -> dict[str, np.ndarray]:
    """{rule: the pair's predicted target points} for each match config, from the same maps
    (``cells``: what maps pixels to the maps' cells, a featurizer or a layer's view)."""
    return {m.rule: match_pixels(cells, fs, ft, r.src_kps, r.src_size, r.trg_size, m.rule, **m.kwargs())["kps"].double().cpu().numpy()
            for m in matches}


def _records(cfg: EvalConfig, records):
    """The pairs to evaluate: those given, else the split's (``limit`` applied)."""
    if records is not None:
        return records
    records = open_dataset(cfg.dataset, cfg.root, **dataset_options(cfg)).pairs(cfg.split)
    return select_pairs(records, limit=cfg.limit, categories=cfg.categories)


def _stream(batcher: Batcher, prompt, records, root, consume, *, workers: int, chunk: int, pending: int, progress: bool):
    """(pair id, what ``consume(record, src map, trg map)`` returned, or the pair's error), in order."""
    # the first pairs wait for the first pictures' features (and a compilation): the bar's clock
    # starts when they are done, so its rate and time left are those of the run, not of its start
    bar = tqdm(total=len(records), unit="pair", desc="evaluate (first features)", disable=not progress, smoothing=0.05)
    started = False
    stream = batcher.stream(prompt, records, root, consume, workers=workers, ahead=2 * chunk, max_pictures=pending)
    try:
        for entry in stream:
            if not started:
                bar.reset(total=len(records))
                bar.set_description("evaluate")
                started = True
            bar.update(1)
            yield entry.record.id, entry.error if entry.error is not None else entry.result
    finally:
        stream.close()  # stops the loader threads, also when the consumer stopped early
        bar.close()


# ------------------------------------------------------------------------------ the run folder
def run_settings(cfg: EvalConfig) -> dict:
    """The settings a run (or a resumption of it, or a sweep's cell) must share."""
    return {k: v for k, v in recorded_config(cfg).items() if k not in _VOLATILE}


def recorded_config(cfg: EvalConfig) -> dict:
    """``cfg`` as a run records it: a limited run also names how its pairs were picked
    (``limit_pairs``), so a run or sweep whose pairs another rule picked is not mixed in;
    ``categories`` only where some were chosen (the runs of earlier versions have none)."""
    return {**{k: v for k, v in as_dict(cfg).items() if k != "categories" or v}, **limit_record(cfg.limit)}


def read_partial(out: Path) -> dict[str, list]:
    """Predictions kept by an earlier, unfinished run (every process's file); a line cut by a
    kill is dropped."""
    got: dict[str, list] = {}
    for f in sorted(out.glob(PARTIAL.replace(".jsonl", "*.jsonl"))):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                got[str(d["id"])] = d["kps"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the last line of a killed run may be cut short
    return got


def _check_resume(out: Path, cfg: EvalConfig, featurizer_settings: dict) -> None:
    _compare(out / RUN, {"config": run_settings(cfg), "featurizer": featurizer_settings})
    check_same_weights(out / RUN)


def check_same_weights(record: Path) -> None:
    """A run continued (``--resume``) loads the hub weights it began with: each model its
    ``record`` (a JSON file) names under ``weights`` must be at the same snapshot commit in
    the hub cache (a model not cached is not compared; a record of a release that did not
    name its weights neither)."""
    try:
        earlier = json.loads(record.read_text(encoding="utf-8")).get("weights") or {}
    except (OSError, ValueError, AttributeError):
        return
    for model, commit in earlier.items():
        now = weights_revision(model)
        if now is not None and now != commit:
            raise Sd4MatchError(f"{record}: the run began with {model} at snapshot {commit}, but the hub cache now holds {now}: its two halves "
                                f"would come from other weights; continue where that snapshot is cached (hf download {model} --revision {commit}) "
                                "or start again in another --out")


def check_evaluation_folder(out: str | Path, *, resume: bool, cfg: EvalConfig | None = None, request: dict | None = None,
                            overwrite: bool = False) -> None:
    """Before any model loads: ``--resume`` needs an unfinished run in ``out`` made with the
    same settings (``cfg`` and the model ``request``, when given); a new run must not start
    over an unfinished one, nor replace a finished one made with other settings unless
    ``overwrite`` (the same settings make the same files again)."""
    out = Path(out)
    unfinished = any(out.glob(PARTIAL.replace(".jsonl", "*.jsonl"))) or (out / RUN).is_file()
    if resume and not (out / RUN).is_file():
        raise Sd4MatchError(f"{out}: no unfinished evaluation to resume ({RUN} is missing); run without --resume")
    if not resume and unfinished:
        raise Sd4MatchError(f"{out}: holds an unfinished evaluation ({PARTIAL}); pass --resume to continue it or choose another --out")
    if resume and cfg is not None:
        _compare(out / RUN, {"config": run_settings(cfg), **({"request": request} if request is not None else {})})
        check_same_weights(out / RUN)
    if not resume and not overwrite and cfg is not None:
        _check_finished(out, {"config": _finished_config(recorded_config(cfg)), **({"request": request} if request is not None else {})})


def _finished_config(config: dict) -> dict:
    """What of a run's ``score.json`` config a new run into its folder must share."""
    return {k: v for k, v in config.items() if k not in _WHERE + _VOLATILE + ("settings",)}


def _check_finished(out: Path, now: dict) -> None:
    """A finished evaluation in ``out`` (its ``score.json``) was made with the settings ``now``
    holds ({"config": ..., "request": ..., "featurizer": ...}, each compared when both have it)."""
    path = out / "score.json"
    if not path.is_file():
        return
    now = json.loads(json.dumps(now, default=str))  # as score.json holds them: tuples as lists, dtypes as text
    try:
        run = json.loads(path.read_text(encoding="utf-8"))["run"]
        earlier = {"config": _finished_config(run["config"]), "request": run.get("request"), "featurizer": run["config"].get("settings")}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return  # not an evaluation's score.json: nothing of ours to keep
    diff = sorted(f"{part}.{k}" for part, d in now.items() if earlier.get(part) is not None
                  for k in set(d) | set(earlier[part]) if earlier[part].get(k) != d.get(k))
    if diff:
        raise Sd4MatchError(f"{out}: holds a finished evaluation made with other settings ({', '.join(diff)}{limit_rule_changed(diff)}); "
                            "choose another --out, or pass --overwrite to replace it")


def _compare(run: Path, now: dict) -> None:
    try:
        earlier = json.loads(run.read_text())
    except json.JSONDecodeError as e:
        raise Sd4MatchError(f"{run}: unreadable ({e})") from None
    diff = sorted(f"{part}.{k}" for part, d in now.items() for k in set(d) | set(earlier.get(part, {})) if earlier.get(part, {}).get(k) != d.get(k))
    if diff:
        raise Sd4MatchError(f"{run}: the earlier run used other settings ({', '.join(diff)}{limit_rule_changed(diff)}); "
                            "resume with the same ones or choose another --out")


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` wrote and resolved: the folder, the featurizer's settings, and the
    score (``score.json``; None on processes other than the first). Path-like: ``out``."""

    out: Path
    settings: dict
    score: dict | None

    def __fspath__(self) -> str:
        return str(self.out)


@locks_out("evaluation")
def evaluate(featurizer, cfg: EvalConfig, out: str | Path, *, dino=None, progress: bool = True, records=None, store: Store | None = None,
             resume: bool = False, request: dict | None = None, overwrite: bool = False) -> Evaluation:
    """Predict, score and write ``predictions.jsonl`` + ``score.json`` into ``out``.

    ``score.json`` equals ``sd4match score`` on ``predictions.jsonl`` under the same
    protocol and alphas, plus the settings that produced it (and the pairs skipped). A
    finished evaluation in ``out`` made with other settings is replaced only with
    ``overwrite``; an unfinished one is continued with ``resume``. ``out`` is locked while
    it runs: a second evaluation into it is refused in one line.
    """
    out = Path(out)
    records = _records(cfg, records)
    prompt = resolve_prompt(cfg.prompt, featurizer, dino=dino)
    check_held_out(prompt, cfg)
    batcher = Batcher(featurizer, dino=dino, store=store, seed=cfg.seed)
    settings = {**featurizer.settings(), **batcher.call_settings(prompt), **_prompt_categories(prompt)}
    rank, world = distributed_rank_world()
    done: dict[str, list] = {}
    check_evaluation_folder(out, resume=resume, cfg=cfg, request=request, overwrite=overwrite)
    if not resume and not overwrite:
        _check_finished(out, {"featurizer": settings})
    weights = weights_record(featurizer, dino)
    if resume:
        _check_resume(out, cfg, settings)
        done = read_partial(out)
    if world > 1:  # every process has checked the folder before any of them writes into it
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not resume:
        atomic_write_text(out / RUN, json.dumps({"config": run_settings(cfg), "featurizer": settings, "request": request or {}, **weights}, indent=2,
                                                default=str))
    t0 = time.perf_counter()
    # sharded: process k predicts pairs k, k + world, ...; every picture's draws are seeded by
    # its content and every call has a fixed size, so the merged predictions equal one process
    mine_recs = [r for r in records[rank::world] if r.id not in done]
    partial = out / (PARTIAL if world == 1 else PARTIAL.replace(".jsonl", f".rank{rank}.jsonl"))
    rules = [m.rule for m in cfg.matches]
    mine: dict[str, dict[str, np.ndarray]] = {}
    bad: dict[str, str] = {}
    with open(partial, "a", encoding="utf-8") as fh:
        for pid, kps in predict_pairs(featurizer, prompt, mine_recs, cfg.root, match=cfg.matches, workers=cfg.workers, chunk=cfg.chunk,
                                      pending=cfg.pending, batcher=batcher, progress=progress and rank == 0):
            if isinstance(kps, BaseException):
                if not (cfg.skip_bad and isinstance(kps, DataError)):
                    if isinstance(kps, Sd4MatchError):
                        raise Sd4MatchError(f"pair {pid}: {first_line(kps)} (predictions so far are kept in {partial}; fix it, then --resume)") from None
                    raise kps
                bad[pid] = first_line(kps)
                continue
            mine[pid] = kps
            line = {rule: np.round(v, 6).tolist() for rule, v in kps.items()}
            fh.write(json.dumps({"id": pid, "kps": line if len(rules) > 1 else line[rules[0]]}) + "\n")
            fh.flush()
            hang_for_tests(out, f"pair:{len(done) + len(mine)}")
    if world > 1:
        mine = gather_dicts(mine)
        bad = gather_dicts(bad)
        if rank != 0:
            return Evaluation(out, settings, None)
    # the model as asked for, too: a later run into this folder is checked against it before its model loads
    doc = _finish(out, cfg, records, done, mine, bad, settings, world, time.perf_counter() - t0,
                  {**_training_cost(prompt), **weights, **({"request": request} if request else {})},
                  stream={**batcher.stream_peak, "work": batcher.work_counts()})
    return Evaluation(out, settings, doc)


def check_held_out(prompt: Prompt | None, cfg: EvalConfig) -> None:
    """A warning when the prompt's training record says it learned from the split it is
    evaluated on (a benchmark's: its pairs do not depend on the root; your own data's may)."""
    t = prompt.config.training if prompt is not None else {}
    if t.get("dataset") == cfg.dataset and t.get("split") == cfg.split and not DATASETS[cfg.dataset].pairs_from_root:
        warnings.warn(f"the prompt was trained on {cfg.dataset}/{cfg.split}, the split it is evaluated on: its scores there are not held out, "
                      "and not comparable with published numbers", Sd4MatchWarning, stacklevel=3)


def _prompt_categories(prompt: Prompt | None) -> dict:
    """A trained prompt's training categories (``score.json`` then reports seen and unseen apart)."""
    cats = prompt.config.training.get("categories") if prompt is not None else None
    return {"prompt_categories": list(cats)} if cats else {}


def weights_record(*models) -> dict:
    """``{"weights": {model id: commit}}``: the hub-cache snapshot each model's hub weights
    loaded from (a fused ``SD+DINOv2`` names both), so a number names the exact weights;
    nothing for folders, files and builtin weights."""
    ids = [part for m in models if m is not None for part in m.model_id.rsplit("+", 1)]  # a fusion's id is SD's + DINOv2's
    revs = {i: rev for i in dict.fromkeys(ids) if (rev := weights_revision(i))}
    return {"weights": revs} if revs else {}


def _training_cost(prompt: Prompt | None) -> dict:
    """What training the prompt (and its adapter) cost, as its folder records it."""
    cost = prompt.config.training.get("cost") if prompt is not None else None
    return {"training_cost": cost} if cost else {}


def _finish(out: Path, cfg: EvalConfig, records, done: dict, mine: dict, bad: dict, settings: dict, world: int, seconds: float,
            extra: dict | None = None, stream: dict | None = None) -> dict:
    """Write ``predictions.jsonl`` (one per rule with ``--match all``) and ``score.json`` of a
    finished run, and remove its partial files; return the score document."""
    rules = [m.rule for m in cfg.matches]
    # every prediction goes through the same JSON round trip, resumed or not
    by_rule: dict[str, dict] = {}
    for rule in rules:
        preds = {pid: np.asarray(v if len(rules) == 1 else v[rule], dtype=np.float64) for pid, v in done.items()}
        preds.update({pid: np.asarray(np.round(v[rule], 6).tolist(), dtype=np.float64) for pid, v in mine.items()})
        preds = {r.id: preds[r.id] for r in records if r.id in preds}
        write_predictions(out / predictions_file(rule, len(rules) > 1), preds.items())
        by_rule[rule] = score(records, preds, protocol=cfg.protocol, alphas=cfg.alphas, allow_missing=bool(bad))
    result = dict(by_rule[rules[0]])
    if len(rules) > 1:
        result["rule"] = rules[0]
        result["by_rule"] = by_rule
    seen = settings.get("prompt_categories")
    if seen:
        for r in (result, *by_rule.values()) if len(rules) > 1 else (result,):
            r["seen_unseen"] = seen_unseen(r, seen)
    label_score(result, cfg.dataset, cfg.split, cfg.categories)
    if bad:
        order = {r.id: i for i, r in enumerate(records)}
        result["skipped"] = [{"id": pid, "problem": msg} for pid, msg in sorted(bad.items(), key=lambda kv: order[kv[0]])]
    # the result holds what makes the numbers; how and where this run went is in run-info.json, so a
    # resumed, sharded or moved run writes the same score.json, byte for byte
    meta = {"config": {**{k: v for k, v in recorded_config(cfg).items() if k not in _WHERE}, "settings": settings}, "git_sha": git_sha(),
            "protocol_note": f"protocol {cfg.protocol} (evaluate's default: sd4match, the official code's frame; sd4match score defaults to standard)"}
    meta.update(extra or {})
    doc = {**result, "run": meta}
    atomic_write_text(out / "score.json", json.dumps(doc, indent=2, default=str))
    info = {**{k: getattr(cfg, k) for k in _WHERE}, "processes": world, "seconds_this_session": round(seconds, 3)}
    if stream:  # this session's largest number of pictures held and pairs waiting, its early (padded) calls, and each model's calls
        info["stream"] = dict(stream)
    atomic_write_text(out / RUN_INFO, json.dumps(info, indent=2, default=str))
    for f in out.glob(PARTIAL.replace(".jsonl", "*.jsonl")):
        f.unlink()
    (out / RUN).unlink(missing_ok=True)
    return json.loads(json.dumps(doc, default=str))


def evaluate_layers(featurizer, cfg: EvalConfig, outs: dict[int, str | Path], *, dino=None, progress: bool = True, records=None,
                    store: Store | None = None) -> dict[int, Evaluation]:
    """``evaluate`` at several ``up_blocks`` of one SD featurizer from one UNet pass per
    picture (``SDLayerStack``): each layer's folder in ``outs`` gets the ``predictions.jsonl``
    and ``score.json`` that ``evaluate`` with ``up_block=k`` writes (the same draws, the same
    call shapes: the same predictions). A run that stops starts again (no partial files)."""
    outs = {int(k): Path(v) for k, v in outs.items()}
    records = _records(cfg, records)
    stack = SDLayerStack(featurizer, list(outs))
    prompt = resolve_prompt(cfg.prompt, featurizer, dino=dino)
    rank, world = distributed_rank_world()
    batcher = Batcher(stack, dino=dino, store=store, seed=cfg.seed)
    views = {k: stack.view(k) for k in stack.layers}

    def consume(r: PairRecord, fs, ft):
        ms, mt = stack.unpack(fs), stack.unpack(ft)
        return {k: _match_rules(views[k], cfg.matches, r, ms[k], mt[k]) for k in stack.layers}

    t0 = time.perf_counter()
    mine: dict[int, dict[str, dict]] = {k: {} for k in stack.layers}
    bad: dict[str, str] = {}
    for pid, got in _stream(batcher, prompt, records[rank::world], cfg.root, consume, workers=cfg.workers, chunk=cfg.chunk,
                            pending=cfg.pending, progress=progress and rank == 0):
        if isinstance(got, BaseException):
            if not (cfg.skip_bad and isinstance(got, DataError)):
                raise got
            bad[pid] = first_line(got)
            continue
        for k in stack.layers:
            mine[k][pid] = got[k]
    if world > 1:
        mine = {k: gather_dicts(v) for k, v in mine.items()}
        bad = gather_dicts(bad)
    seconds = time.perf_counter() - t0
    result = {}
    for k, out in outs.items():
        settings = {**featurizer.settings(), "up_block": k, **batcher.call_settings(prompt), **_prompt_categories(prompt)}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        doc = _finish(out, cfg, records, {}, mine[k], bad, settings, world, seconds / len(outs), {**_training_cost(prompt), **weights_record(featurizer, dino)}
                      ) if rank == 0 else None
        result[k] = Evaluation(out, settings, doc)
    return result


def predictions_file(rule: str, several: bool) -> str:
    """The predictions file of ``rule`` in an evaluation folder."""
    return f"predictions.{rule}.jsonl" if several else "predictions.jsonl"


def print_score(out: str | Path) -> str:
    """The score table of an evaluation folder, as ``sd4match evaluate`` prints it (one table
    per rule after ``--match all``)."""
    res = json.loads((Path(out) / "score.json").read_text())
    where = f"{res['dataset']}/{res['split']}"
    tables = res.get("by_rule") or {None: res}
    text = "\n\n".join(format_table(r, f"{where}" + (f", match {rule}" if rule else "")) for rule, r in tables.items())
    if res.get("skipped"):
        text += f"\n{len(res['skipped'])} pairs skipped (unreadable images, scored as missing): see score.json"
    return text


class _CallableModule(types.ModuleType):
    """``sd4match.evaluate`` is this module (the import system makes it the package's
    attribute) and the public ``evaluate`` function at once: calling it calls ``evaluate``."""

    def __call__(self, *args, **kwargs) -> Evaluation:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
