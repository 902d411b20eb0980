"""Extract and keep the feature maps of a folder of images (``sd4match features``).

The maps live in a ``Store`` folder (``<out>/features/<key>.safetensors``, keyed by the
picture's content and every setting); ``<out>/index.json`` names each image's entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from sd4match.batching import Batcher, Picture, prefetch
from sd4match.data.images import NO_IMAGES, list_images, load_image
from sd4match.errors import Sd4MatchError
from sd4match.features.base import Featurizer
from sd4match.fileio import atomic_write_text, file_sha256
from sd4match.prompts import PromptSpec, resolve_prompt
from sd4match.store import Store


def extract_folder(
    featurizer: Featurizer,
    images: str | Path,
    out: str | Path,
    *,
    text: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    workers: int = 4,
    progress: bool = True,
    store_gb: float = 0.5,
) -> Path:
    """Features of every image under ``images`` into the store folder ``out``.

    Each picture's random draws are seeded from ``seed`` and its content, so its features
    are the same whatever it is batched with. Pictures already stored under the same
    settings are skipped; unreadable store files are recomputed.

    Returns:
        the path of ``out/index.json``: image path (relative to ``images``) -> store entry,
        file SHA-256, image size and feature grid.
    """
    images, out = Path(images), Path(out)
    if text is not None and not featurizer.takes_prompt:
        raise Sd4MatchError(f"{featurizer.model_id} takes no prompt: --text would change nothing; leave it out")
    files = list_images(images)
    if not files:
        raise Sd4MatchError(f"{images}: {NO_IMAGES}")
    store = Store(max_bytes=int(store_gb * (1 << 30)), folder=out)
    batcher = Batcher(featurizer, store=store, seed=seed, fixed_batches=False)
    prompt = resolve_prompt(PromptSpec("empty") if text is None else PromptSpec("text", template=text), featurizer) if featurizer.takes_prompt else None
    emb, prompt_id = batcher.embeds(prompt), batcher.prompt_id(prompt)
    settings = {**featurizer.settings(), "text": text, "seed": seed}
    index: dict[str, dict] = {}
    res = batcher.picture_resolution
    bar = tqdm(total=len(files), unit="img", desc="features", disable=not progress)
    pending: list[tuple[str, Path, Picture]] = []

    def flush():
        batcher.features([p for _, _, p in pending], emb, prompt_id)
        for rel, path, pic in pending:
            index[rel] = {"file": f"features/{batcher.feature_key(pic, prompt_id)}.safetensors", "sha256": file_sha256(path),
                          "image_size": list(pic.image.size), "grid_size": list(featurizer.grid_size)}
        bar.update(len(pending))
        pending.clear()

    for path, pic in prefetch(files, lambda p: Picture(load_image(p, exif_transpose=True)).prepare(res), workers=workers):
        if isinstance(pic, BaseException):
            raise pic
        pending.append((path.relative_to(images).as_posix(), path, pic))
        if len(pending) >= max(1, batch_size):
            flush()
    if pending:
        flush()
    bar.close()
    path = out / "index.json"
    atomic_write_text(path, json.dumps({"settings": settings, "images": index}, indent=1, default=str))
    return path


def load_cached(index_path: str | Path, image: str) -> torch.Tensor:
    """The stored (C, h, w) map of ``image`` (relative path as in ``index.json``)."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    entry = idx["images"].get(image)
    if entry is None:
        raise Sd4MatchError(f"{index_path}: no features for {image}")
    got = Store(folder=index_path.parent).get("features", Path(entry["file"]).stem)
    if got is None:
        raise Sd4MatchError(f"{index_path.parent / entry['file']}: stored features missing or unreadable; run `sd4match features` again")
    return got["features"][0]
