"""Content-keyed feature cache: safetensors files named by image hash + every setting.

A cache entry's key is the SHA-256 of the image file's bytes together with everything
that changes the features (model id, timestep, block, ensemble, latent mode, resolution,
prompt, seed). The same image under other settings gets another key; a renamed image
keeps its key. Files are written under a temporary name and renamed; a file that does
not load, or whose stored key differs, is treated as absent and recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sd4match.fileio import atomic_path

FORMAT = "sd4match-features-1"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def settings_key(image_hash: str, settings: dict) -> str:
    blob = json.dumps({"image": image_hash, "settings": settings, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def image_key(img) -> str:
    """SHA-256 of a decoded image's pixels and size: equal for equal pictures, whatever the file."""
    return hashlib.sha256(img.tobytes() + repr(img.size).encode()).hexdigest()


def seed_for(image_hash: str, seed: int) -> int:
    """A per-image seed: an image's features do not depend on what it was batched with."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_hash}".encode()).digest()[:7], "little")


class FeatureCache:
    """A folder of ``<key>.safetensors`` feature maps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, dict] | None:
        """The cached map and its metadata, or None when absent or unreadable.

        The file is read into memory (not memory-mapped), so a cache file replaced or
        damaged later never affects a tensor already returned.
        """
        from safetensors.torch import load

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            data = p.read_bytes()
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
            if meta.get("key") != key:
                return None
            return load(data)["features"], meta
        except Exception:  # truncated or corrupt file: recompute it
            return None

    def put(self, key: str, features: torch.Tensor, meta: dict) -> Path:
        from safetensors.torch import save_file

        p = self.path(key)
        with atomic_path(p) as tmp:
            save_file({"features": features.detach().to("cpu").contiguous()}, str(tmp), metadata={"key": key, **{k: str(v) for k, v in meta.items()}})
        return p
