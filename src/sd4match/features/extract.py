"""Extract and cache the feature maps of a folder of images (``sd4match features``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sd4match.data.images import list_images, load_image
from sd4match.errors import Sd4MatchError
from sd4match.features.base import Featurizer
from sd4match.features.cache import FeatureCache, file_sha256, seed_for, settings_key
from sd4match.fileio import atomic_write_text


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if present, else Apple MPS, else CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            # one GPU per process under torchrun / accelerate launch
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Sd4MatchError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    return dev


def extract_folder(
    featurizer: Featurizer,
    images: str | Path,
    out: str | Path,
    *,
    text: str | None = None,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> Path:
    """Features of every image under ``images`` into the cache folder ``out``.

    Each image gets its own generator, seeded from ``seed`` and its content hash, so its
    features are the same whatever it is batched with. Images already cached under the
    same settings are skipped; unreadable cache files are recomputed.

    Returns:
        the path of ``out/index.json``: image path (relative to ``images``) -> cache file,
        image size and feature grid.
    """
    images, out = Path(images), Path(out)
    files = list_images(images)
    if not files:
        raise Sd4MatchError(f"{images}: no images found (looked for .jpg, .jpeg, .png, .bmp, .webp, .tif)")
    cache = FeatureCache(out)
    settings = {**featurizer.settings(), "text": text, "seed": seed}
    todo, index = [], {}
    for p in files:
        rel = p.relative_to(images).as_posix()
        h = file_sha256(p)
        key = settings_key(h, settings)
        index[rel] = {"file": cache.path(key).name, "sha256": h}
        got = cache.get(key)  # a full read: a damaged file counts as absent
        if got is None:
            todo.append((rel, p, h, key))
        else:
            index[rel]["image_size"] = json.loads(got[1]["image_size"])
    from tqdm import tqdm

    bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", desc="features", disable=not progress)
    dev = featurizer.device
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        imgs = [load_image(p, exif_transpose=True) for _, p, _, _ in chunk]
        for (rel, p, h, key), img in zip(chunk, imgs):
            gen = torch.Generator(device=dev).manual_seed(seed_for(h, seed))
            feats = featurizer([img], text=None if text is None else [text], generator=gen)[0]
            cache.put(key, feats, {"image": rel, "image_size": json.dumps(list(img.size)), "settings": json.dumps(settings, default=str)})
            index[rel]["image_size"] = list(img.size)
            bar.update(1)
    bar.close()
    for entry in index.values():
        entry["grid_size"] = list(featurizer.grid_size)
    path = out / "index.json"
    atomic_write_text(path, json.dumps({"settings": settings, "images": index}, indent=1, default=str))
    return path


def load_cached(index_path: str | Path, image: str) -> torch.Tensor:
    """The cached (C, h, w) map of ``image`` (relative path as in ``index.json``)."""
    index_path = Path(index_path)
    idx = json.loads(index_path.read_text())
    entry = idx["images"].get(image)
    if entry is None:
        raise Sd4MatchError(f"{index_path}: no features for {image}")
    got = FeatureCache(index_path.parent).get(Path(entry["file"]).stem)
    if got is None:
        raise Sd4MatchError(f"{index_path.parent / entry['file']}: cache file missing or unreadable; run `sd4match features` again")
    return got[0]
