"""``sd4match evaluate``: predict every pair of a split, write predictions and PCK.

The pipeline keeps the GPU fed: loader threads decode and squash the pictures of the
coming pairs (``frozen.prefetch``); pairs are taken in chunks; a pair-independent prompt
(empty, text, single, category) gets each picture's features once, ``max_batch //
ensemble`` pictures a UNet call, kept in the store; a CPM prompt is built per pair, and
``max_batch // (2 x ensemble)`` pairs share a UNet call, the VAE posteriors and DINOv2
tokens coming from the store. Every picture's random draws are seeded by its content and
every call has a fixed size, so the predictions equal a one-pair-at-a-time run, a sharded
run and a resumed run, bit for bit.

Nothing done is lost: predictions are appended and flushed pair by pair to
``predictions.partial.jsonl`` (one file per process) next to ``run.json`` (the settings);
``--resume`` continues at the first missing pair when the settings match. Only a finished
run writes ``predictions.jsonl`` and ``score.json`` (through temporary names), so an
earlier run's results stay as they were until the new ones are complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from sd4match.data import load_pair_images, open_dataset
from sd4match.data.records import PairRecord
from sd4match.errors import DataError, Sd4MatchError, first_line
from sd4match.fileio import atomic_write_text
from sd4match.frozen import Frozen, Picture, prefetch
from sd4match.matching import match_pixels
from sd4match.metrics import DEFAULT_ALPHAS, format_table, score, write_predictions
from sd4match.runtime import distributed_rank_world, gather_dicts, git_sha, hang_for_tests
from sd4match.store import Store

PARTIAL = "predictions.partial.jsonl"
RUN = "run.json"
#: settings that may differ between a run and its resumption
_VOLATILE = ("settings", "workers", "chunk", "skip_bad", "preset")


@dataclass
class EvalConfig:
    dataset: str
    root: str
    split: str = "test"
    prompt: str = "empty"  # a prompt folder, "empty", or "text" / "text:<template>"
    rule: str = "kernel-softargmax"
    protocol: str = "sd4match"
    alphas: Sequence[float] = DEFAULT_ALPHAS
    seed: int = 0
    temperature: float = 0.04
    sigma: float = 7.0
    limit: int = 0  # only the first N pairs of the split (0: all), for a quick look
    workers: int = 4  # loader threads decoding and resizing ahead
    chunk: int = 32  # loader threads decode up to 2 x chunk pairs ahead
    skip_bad: bool = False  # go past pairs with unreadable images (scored as missing, listed in score.json)
    preset: str | None = None  # a zero-shot baseline's settings (dift, dinov2, sd-dino-fuse), when one was asked for
    settings: dict = field(default_factory=dict)  # the featurizer's, filled in


def resolve_prompt(spec: str, featurizer, *, dino=None):
    """``empty``, ``text`` / ``text:<template>`` or a prompt folder -> a prompt (None for featurizers without prompts)."""
    from sd4match.prompts import EmptyPrompt, TextPrompt, bridge_for, load_prompt

    if not hasattr(featurizer, "text_encoder"):
        if spec not in ("empty", "none"):
            raise Sd4MatchError(f"{featurizer.model_id} takes no prompt; use --prompt empty")
        return None
    if spec == "empty":
        return EmptyPrompt(bridge_for(featurizer))
    if spec == "text" or spec.startswith("text:"):
        template = spec[5:] if spec.startswith("text:") else "a photo of a {category}"
        return TextPrompt(bridge_for(featurizer), template)
    if not Path(spec).is_dir():
        raise Sd4MatchError(f"--prompt {spec}: not a prompt folder, 'empty', 'text' or 'text:<template>'")
    prompt = load_prompt(spec, featurizer)
    if prompt.kind == "cpm" and dino is None:
        raise Sd4MatchError(f"{spec}: a CPM prompt needs DINOv2 features (--dino)")
    return prompt


def _load(root, r: PairRecord, resolution: int | None) -> tuple[Picture, Picture]:
    src, trg = load_pair_images(root, r)
    return Picture(src).prepare(resolution), Picture(trg).prepare(resolution)


def _tag(prompt, category: str) -> str:
    return category if prompt is not None and prompt.kind in ("category", "text") else "-"


def predict_pairs(featurizer, prompt, records: Sequence[PairRecord], root, cfg: EvalConfig, *, dino=None, store: Store | None = None,
                  frozen: Frozen | None = None, progress: bool = True) -> Iterator[tuple[str, np.ndarray | BaseException]]:
    """Yield (pair id, predicted target points in original pixels) for ``records``, in order.

    Pairs stream through: loader threads decode ahead; a UNet call runs as soon as
    ``pictures_per_call`` new pictures (pair-independent prompts) or ``pairs_per_call``
    pairs (CPM) are waiting, so every call but the last is full. A pair whose pictures
    cannot be read yields its ``DataError`` instead of points.
    """
    from collections import deque

    from tqdm import tqdm

    from sd4match.prompts import prompt_fingerprint

    frozen = frozen or Frozen(featurizer, dino=dino, store=store, seed=cfg.seed)
    per_pair = prompt is not None and prompt.kind == "cpm"
    resolution = featurizer.resolution if frozen.is_sd else None
    fingerprint = prompt_fingerprint(prompt)
    embs: dict[str, torch.Tensor | None] = {}
    bar = tqdm(total=len(records), unit="pair", desc="evaluate", disable=not progress, smoothing=0.05)
    loaded = prefetch(records, lambda r: _load(root, r, resolution), workers=cfg.workers, ahead=2 * cfg.chunk)
    queue: deque = deque()  # [record, pictures or error, prediction or None], in record order
    todo: dict[tuple, tuple] = {}  # (picture key, prompt id) -> (picture, embeddings), waiting for a UNet call

    def predict(r, fs, ft):
        out = match_pixels(featurizer, fs, ft, r.src_kps, r.src_size, r.trg_size, cfg.rule, temperature=cfg.temperature, sigma=cfg.sigma)
        return out["kps"].double().cpu().numpy()

    def emb_for(r):
        tag = _tag(prompt, r.category)
        if tag not in embs:
            with torch.no_grad():
                embs[tag] = None if prompt is None else prompt({"categories": [r.category]})
        return f"{fingerprint}:{tag}", embs[tag]

    def match_ready():
        for entry in queue:
            r, pics, res = entry
            if res is None and not isinstance(pics, BaseException) and not per_pair:
                pid, _ = emb_for(r)
                if (pics[0].key, pid) in todo or (pics[1].key, pid) in todo:
                    continue
                fs, ft = frozen.stored_map(pics[0], pid), frozen.stored_map(pics[1], pid)
                if fs is None or ft is None:  # evicted from memory meanwhile: computed again (same bits)
                    for p in pics:
                        todo.setdefault((p.key, pid), (p, embs[_tag(prompt, r.category)]))
                    continue
                entry[2] = predict(r, fs, ft)

    def run_pictures(final: bool):
        n = frozen.pictures_per_call()
        while len(todo) >= n or (final and todo):
            items = [(k, todo.pop(k)) for k in list(todo)[:n]]
            frozen.compute_maps([p for _, (p, _) in items], [e for _, (_, e) in items], [pid for (_, pid), _ in items])
            match_ready()

    def run_pairs(final: bool):
        n = frozen.pairs_per_call()
        waiting = [e for e in queue if e[2] is None and not isinstance(e[1], BaseException)]
        while len(waiting) >= n or (final and waiting):
            grp, waiting = waiting[:n], waiting[n:]
            full = frozen.pad(grp, n)
            src, trg = [e[1][0] for e in full], [e[1][1] for e in full]
            with torch.no_grad():
                emb = prompt({"dino_src": frozen.tokens(src), "dino_trg": frozen.tokens(trg)})
            fs, ft = frozen.pair_features(src, trg, emb)
            for i, e in enumerate(grp):
                e[2] = predict(e[0], fs[i : i + 1], ft[i : i + 1])

    def ready(entry) -> bool:
        return isinstance(entry[1], BaseException) or entry[2] is not None

    try:
        for r, pics in loaded:
            queue.append([r, pics, None])
            if not isinstance(pics, BaseException) and not per_pair:
                pid, emb = emb_for(r)
                for p in pics:
                    if (p.key, pid) not in todo and not frozen.store.contains("features", frozen.feature_key(p, pid)):
                        todo[(p.key, pid)] = (p, emb)
                match_ready()
            (run_pairs if per_pair else run_pictures)(False)
            while queue and ready(queue[0]):
                e = queue.popleft()
                bar.update(1)
                yield e[0].id, e[1] if isinstance(e[1], BaseException) else e[2]
        (run_pairs if per_pair else run_pictures)(True)
        while queue:
            e = queue.popleft()
            bar.update(1)
            yield e[0].id, e[1] if isinstance(e[1], BaseException) else e[2]
    finally:
        loaded.close()  # stop the loader threads, also when the consumer stopped early
        bar.close()


# ------------------------------------------------------------------------------ the run folder
def _run_settings(cfg: EvalConfig) -> dict:
    d = {**asdict(cfg), "alphas": list(cfg.alphas)}
    return {k: v for k, v in d.items() if k not in _VOLATILE}


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
    _compare(out / RUN, {"config": _run_settings(cfg), "featurizer": featurizer_settings})


def check_evaluation_folder(out: str | Path, *, resume: bool, cfg: EvalConfig | None = None, request: dict | None = None) -> None:
    """Before any model loads: ``--resume`` needs an unfinished run in ``out`` made with the
    same settings (``cfg`` and the model ``request``, when given); a new run must not start
    over one."""
    out = Path(out)
    unfinished = any(out.glob(PARTIAL.replace(".jsonl", "*.jsonl"))) or (out / RUN).is_file()
    if resume and not (out / RUN).is_file():
        raise Sd4MatchError(f"{out}: no unfinished evaluation to resume ({RUN} is missing); run without --resume")
    if not resume and unfinished:
        raise Sd4MatchError(f"{out}: holds an unfinished evaluation ({PARTIAL}); pass --resume to continue it or choose another --out")
    if resume and cfg is not None:
        _compare(out / RUN, {"config": _run_settings(cfg), **({"request": request} if request is not None else {})})


def _compare(run: Path, now: dict) -> None:
    try:
        earlier = json.loads(run.read_text())
    except json.JSONDecodeError as e:
        raise Sd4MatchError(f"{run}: unreadable ({e})") from None
    diff = sorted(f"{part}.{k}" for part, d in now.items() for k in d if earlier.get(part, {}).get(k) != d[k])
    if diff:
        raise Sd4MatchError(f"{run}: the earlier run used other settings ({', '.join(diff)}); resume with the same ones or choose another --out")


def evaluate(featurizer, cfg: EvalConfig, out: str | Path, *, dino=None, progress: bool = True, records=None, store: Store | None = None,
             resume: bool = False, request: dict | None = None) -> Path:
    """Predict, score and write ``predictions.jsonl`` + ``score.json`` into ``out``; return ``out``.

    ``score.json`` equals ``sd4match score`` on ``predictions.jsonl`` under the same
    protocol and alphas, plus the settings that produced it (and the pairs skipped).
    """
    out = Path(out)
    if records is None:
        records = open_dataset(cfg.dataset, cfg.root).pairs(cfg.split)
        if cfg.limit:
            records = records[: cfg.limit]
    prompt = resolve_prompt(cfg.prompt, featurizer, dino=dino)
    cfg.settings = featurizer.settings()
    rank, world = distributed_rank_world()
    done: dict[str, list] = {}
    check_evaluation_folder(out, resume=resume)
    if resume:
        _check_resume(out, cfg, cfg.settings)
        done = read_partial(out)
    if world > 1:  # every process has checked the folder before any of them writes into it
        import torch.distributed as dist

        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not resume:
        atomic_write_text(out / RUN, json.dumps({"config": _run_settings(cfg), "featurizer": cfg.settings, "request": request or {}}, indent=2, default=str))
    t0 = time.perf_counter()
    # sharded: process k predicts pairs k, k + world, ...; every picture's draws are seeded by
    # its content and every call has a fixed size, so the merged predictions equal one process
    mine_recs = [r for r in records[rank::world] if r.id not in done]
    partial = out / (PARTIAL if world == 1 else PARTIAL.replace(".jsonl", f".rank{rank}.jsonl"))
    mine: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    with open(partial, "a", encoding="utf-8") as fh:
        for pid, kps in predict_pairs(featurizer, prompt, mine_recs, cfg.root, cfg, dino=dino, store=store, progress=progress and rank == 0):
            if isinstance(kps, BaseException):
                if not (cfg.skip_bad and isinstance(kps, DataError)):
                    if isinstance(kps, Sd4MatchError):
                        raise Sd4MatchError(f"pair {pid}: {first_line(kps)} (predictions so far are kept in {partial}; fix it, then --resume)") from None
                    raise kps
                bad[pid] = first_line(kps)
                continue
            mine[pid] = kps
            fh.write(json.dumps({"id": pid, "kps": np.round(kps, 6).tolist()}) + "\n")
            fh.flush()
            hang_for_tests(out, f"pair:{len(done) + len(mine)}")
    if world > 1:
        mine = gather_dicts(mine)
        bad = gather_dicts(bad)
        if rank != 0:
            return out
    seconds = time.perf_counter() - t0
    # every prediction goes through the same JSON round trip, resumed or not
    preds = {pid: np.asarray(v, dtype=np.float64) for pid, v in done.items()}
    preds.update({pid: np.asarray(np.round(v, 6).tolist(), dtype=np.float64) for pid, v in mine.items()})
    preds = {r.id: preds[r.id] for r in records if r.id in preds}
    write_predictions(out / "predictions.jsonl", preds.items())
    result = score(records, preds, protocol=cfg.protocol, alphas=cfg.alphas, allow_missing=bool(bad))
    result["dataset"], result["split"] = cfg.dataset, cfg.split
    if bad:
        result["skipped"] = [{"id": pid, "problem": msg} for pid, msg in sorted(bad.items(), key=lambda kv: [r.id for r in records].index(kv[0]))]
    meta = {"config": {**asdict(cfg), "alphas": list(cfg.alphas)}, "git_sha": git_sha(), "processes": world,
            "protocol_note": f"protocol {cfg.protocol} (evaluate's default: sd4match, the official code's frame; sd4match score defaults to standard)"}
    meta["seconds_this_session"] = round(seconds, 3)
    atomic_write_text(out / "score.json", json.dumps({**result, "run": meta}, indent=2, default=str))
    for f in out.glob(PARTIAL.replace(".jsonl", "*.jsonl")):
        f.unlink()
    (out / RUN).unlink(missing_ok=True)
    return out


def print_score(out: str | Path) -> str:
    res = json.loads((Path(out) / "score.json").read_text())
    text = format_table(res, f"{res['dataset']}/{res['split']}")
    if res.get("skipped"):
        text += f"\n{len(res['skipped'])} pairs skipped (unreadable images, scored as missing): see score.json"
    return text
