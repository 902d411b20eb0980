"""``sd4match evaluate``: predict every pair of a split, write predictions and PCK.

Features of an image are extracted once and reused for every pair it appears in when the
prompt does not depend on the pair (text, empty, single, category); a CPM prompt is built
per pair from both images, so its features are extracted per pair. Each image's random
draws (latent sample, noise) come from a generator seeded by ``seed`` and the image's
content, so a pair's prediction does not depend on the order or the batch it ran in.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from sd4match.data import is_plain, load_annotated_image, load_pair_images, open_dataset
from sd4match.data.records import PairRecord
from sd4match.errors import Sd4MatchError
from sd4match.features.cache import image_key, seed_for
from sd4match.fileio import atomic_write_text
from sd4match.matching import match_pixels
from sd4match.metrics import DEFAULT_ALPHAS, format_table, score, write_predictions


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
    cache_size: int = 64  # feature maps kept in memory
    limit: int = 0  # only the first N pairs of the split (0: all), for a quick look
    settings: dict = field(default_factory=dict)  # the featurizer's, filled in


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` or ``torchrun``; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines, NCCL on GPUs
    return state.process_index, state.num_processes


def gather_dicts(mine: dict) -> dict:
    """Every process's dict merged into one, on every process (a collective: all must call it)."""
    from accelerate.utils import gather_object

    merged: dict = {}
    for part in gather_object([mine]):
        merged.update(part)
    return merged


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


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def predict_pairs(featurizer, prompt, records: Sequence[PairRecord], root, cfg: EvalConfig, *, dino=None, progress: bool = True):
    """Yield (pair id, predicted target points in original pixels) for ``records``."""
    from tqdm import tqdm

    dev = featurizer.device
    cache = _LRU(cfg.cache_size)
    per_pair = prompt is not None and prompt.kind == "cpm"
    embs: dict[str, torch.Tensor | None] = {}  # prompt embeddings that do not depend on the pair
    bar = tqdm(records, unit="pair", desc="evaluate", disable=not progress, smoothing=0.05)

    def compute(img, emb):
        gen = torch.Generator(device=dev).manual_seed(seed_for(image_key(img), cfg.seed))
        with torch.no_grad():
            return featurizer([img], prompt_embeds=emb, generator=gen)

    def features(img, emb, tag):
        key = (image_key(img), tag)
        if key not in cache:
            cache.put(key, compute(img, emb))
        return cache[key]

    def stored_features(rel, size, emb, tag):
        """A stored image's map: decoded only when not cached already."""
        key = ("file", rel, tag)
        if key not in cache:
            cache.put(key, compute(load_annotated_image(root, rel, size), emb))
        return cache[key]

    for r in bar:
        if per_pair:
            src, trg = load_pair_images(root, r)
            with torch.no_grad():
                emb = prompt({"dino_src": dino.tokens([src]), "dino_trg": dino.tokens([trg])})
            fs, ft = features(src, emb, r.id), features(trg, emb, r.id)
        else:
            tag = r.category if prompt is not None and prompt.kind in ("category", "text") else "-"
            if tag not in embs:
                with torch.no_grad():
                    embs[tag] = None if prompt is None else prompt({"categories": [r.category]})
            emb = embs[tag]
            if is_plain(r):
                fs, ft = stored_features(r.src, r.src_size, emb, tag), stored_features(r.trg, r.trg_size, emb, tag)
            else:
                src, trg = load_pair_images(root, r)
                fs, ft = features(src, emb, tag), features(trg, emb, tag)
        out = match_pixels(featurizer, fs, ft, r.src_kps, r.src_size, r.trg_size, cfg.rule, temperature=cfg.temperature, sigma=cfg.sigma)
        yield r.id, out["kps"].double().cpu().numpy()


def evaluate(featurizer, cfg: EvalConfig, out: str | Path, *, dino=None, progress: bool = True, records=None) -> Path:
    """Predict, score and write ``predictions.jsonl`` + ``score.json`` into ``out``; return ``out``.

    ``score.json`` equals ``sd4match score`` on ``predictions.jsonl`` under the same
    protocol and alphas, plus the settings that produced it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = open_dataset(cfg.dataset, cfg.root).pairs(cfg.split)
        if cfg.limit:
            records = records[: cfg.limit]
    prompt = resolve_prompt(cfg.prompt, featurizer, dino=dino)
    cfg.settings = featurizer.settings()
    rank, world = distributed_rank_world()
    t0 = time.perf_counter()
    # sharded: process k predicts pairs k, k + world, ...; every pair's draws are seeded by
    # its images' content, so the merged predictions equal a single-process run
    mine = dict(predict_pairs(featurizer, prompt, records[rank::world], cfg.root, cfg, dino=dino, progress=progress and rank == 0))
    if world > 1:
        mine = gather_dicts(mine)
        if rank != 0:
            return out
    preds = {r.id: mine[r.id] for r in records}
    seconds = time.perf_counter() - t0
    write_predictions(out / "predictions.jsonl", preds.items())
    result = score(records, preds, protocol=cfg.protocol, alphas=cfg.alphas)
    result["dataset"], result["split"] = cfg.dataset, cfg.split
    meta = {"config": {**asdict(cfg), "alphas": list(cfg.alphas)}, "git_sha": git_sha(), "processes": world,
            "seconds": round(seconds, 3), "pairs_per_second": round(len(records) / max(seconds, 1e-9), 3)}
    atomic_write_text(out / "score.json", json.dumps({**result, "run": meta}, indent=2, default=str))
    return out


def print_score(out: str | Path) -> str:
    res = json.loads((Path(out) / "score.json").read_text())
    return format_table(res, f"{res['dataset']}/{res['split']}")
