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
from sd4match.fileio import atomic_save_image, atomic_write_text, file_sha256
from sd4match.prompts import PromptSpec, parse_prompt, prompt_fingerprint, resolve_prompt
from sd4match.runtime import locks_out
from sd4match.store import Store
from sd4match.viz import draw_pca


def picture_prompt_name(prompt: str | None, text: str | None) -> str | None:
    """The ``--prompt`` that ``--prompt`` or ``--text`` names (``text:<text>``); not both."""
    if text is not None and prompt is not None:
        raise Sd4MatchError("give a text prompt as --text or as --prompt text:..., not both")
    return f"text:{text}" if text is not None else prompt


def check_picture_prompt(prompt: str | PromptSpec, category: str | None) -> PromptSpec:
    """A prompt that gives a picture a map of its own (not a per-pair one, whose maps are made
    from both pictures of a pair), with the category it needs; else one line, before any
    model loads."""
    spec = parse_prompt(prompt)
    if spec.per_pair:
        raise Sd4MatchError(f"--prompt {prompt}: a {spec.kind} prompt makes a picture's map from both pictures of a pair, so a picture alone has none; "
                            "use `sd4match match` or `transfer` with it, or a prompt of one picture (e.g. cpm-image)")
    if spec.requires_category and not category:
        raise Sd4MatchError(f"--prompt {prompt}: this prompt needs --category")
    return spec


@locks_out("feature extraction")  # a second extraction into the same store would overwrite its index.json
def extract_folder(
    featurizer: Featurizer,
    images: str | Path,
    out: str | Path,
    *,
    text: str | None = None,
    prompt: str | PromptSpec | None = None,
    category: str | None = None,
    dino=None,
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

    Args:
        text: a text prompt (``prompt="text:<text>"``).
        prompt: a prompt whose maps do not depend on a partner picture: ``empty`` (the
            default), ``text:...``, or a trained prompt folder (``single``, ``category`` with
            ``category``, ``hidden``, ``cpm-image`` with ``dino``, ...). A ``cpm`` prompt makes
            a picture's map from both pictures of a pair, so it has no map of one picture.
        category: the category of every picture, for per-category prompts and ``{category}``.
        dino: the DINOv2 featurizer of a prompt conditioned on each picture's tokens.

    Returns:
        the path of ``out/index.json``: image path (relative to ``images``) -> store entry,
        file SHA-256, image size and feature grid.
    """
    images, out = Path(images), Path(out)
    name = picture_prompt_name(prompt, text) or "empty"
    if text is not None and not featurizer.takes_prompt:
        raise Sd4MatchError(f"{featurizer.model_id} takes no prompt: --text would change nothing; leave it out")
    spec = check_picture_prompt(name, category)
    files = list_images(images, exclude=out)  # not pca.png when the store lies inside the folder
    if not files:
        raise Sd4MatchError(f"{images}: {NO_IMAGES}")
    store = Store(max_bytes=int(store_gb * (1 << 30)), folder=out)
    batcher = Batcher(featurizer, dino=dino, store=store, seed=seed, fixed_batches=False)
    resolved = resolve_prompt(spec, featurizer, dino=dino)  # None for a featurizer without prompts
    category = category if resolved is not None and resolved.uses_category else None
    prompt_id = batcher.prompt_id(resolved, category)
    emb = None if resolved is not None and resolved.per_picture_condition else batcher.embeds(resolved, category)
    settings = {**featurizer.settings(), "prompt": name, "text": text,
                "prompt_fingerprint": prompt_fingerprint(resolved), "category": category, "seed": seed}
    index: dict[str, dict] = {}
    res = batcher.picture_resolution
    bar = tqdm(total=len(files), unit="img", desc="features", disable=not progress)
    pending: list[tuple[str, Path, Picture]] = []

    def flush():
        if emb is None and resolved is not None:  # each picture under its own prompt (made from its DINOv2 tokens)
            for _, _, p in pending:
                batcher.features([p], batcher.picture_embeds(resolved, p, category), prompt_id)
        else:
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


def pca_sheet(index_path: str | Path, images: str | Path, out: str | Path, *, count: int = 8, seed: int = 0) -> Path:
    """``out`` (PNG): the first ``count`` pictures of an ``extract_folder`` index (in its
    order) beside the joint PCA of their stored maps (``viz.draw_pca``)."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    names = list(idx["images"])[:count]
    if not names:
        raise Sd4MatchError(f"{index_path}: lists no pictures")
    pictures = [(name, load_image(Path(images) / name, exif_transpose=True)) for name in names]
    maps = [load_cached(index_path, name) for name in names]
    settings = idx["settings"]
    title = str(settings.get("model"))
    if settings.get("prompt_fingerprint") != "none":  # a model that takes a prompt: which one
        title += f", prompt {settings.get('prompt')}" + (f" ({settings['category']})" if settings.get("category") else "")
    return atomic_save_image(out, draw_pca(pictures, maps, seed=seed, title=title))
