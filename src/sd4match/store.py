"""One content-keyed store for work the frozen models do once (DESIGN.md, "Work done once").

Entries are named by what they are made from: the picture's content (``image_key``: the
SHA-256 of its decoded pixels and size, whatever file or name it came from) and every
setting that changes the result. Three kinds are stored:

- ``posterior``: the VAE posterior of a picture, its mean and std (fp32), so that a latent
  sample drawn with a call's generator is the same draw as without the store;
- ``dino``: the DINOv2 patch tokens of a picture (the CPM's input);
- ``features``: the feature map of a picture under a prompt that does not depend on the
  pair (empty, text, single, category), a model setting and a seed;
- ``name``: the content key of a picture file (``name``/``remember_name``), so that a run
  whose maps are stored decodes no picture.

The store keeps entries in memory, least recently used first out, up to ``max_bytes``;
with a ``folder`` it also keeps them on disk (safetensors, written under a temporary name
and renamed), so later runs skip the work. A disk entry that does not load, or whose
stored key differs, counts as absent and is recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import Counter, OrderedDict
from pathlib import Path
import torch

from sd4match.fileio import atomic_path

FORMAT = "sd4match-store-1"


def image_key(img) -> str:
    """SHA-256 of a decoded picture's pixels and size: equal for equal pictures, whatever the file."""
    return hashlib.sha256(img.tobytes() + repr(img.size).encode()).hexdigest()


def seed_for(image_hash: str, seed: int) -> int:
    """A per-picture seed: a picture's random draws do not depend on what it was batched with."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_hash}".encode()).digest()[:7], "little")


def settings_key(image_hash: str, settings: dict) -> str:
    """The 40-hex-digit (160-bit) name of an entry: the picture's hash and the settings."""
    blob = json.dumps({"image": image_hash, "settings": settings, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view into a larger storage."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _header_meta(fh) -> dict:
    """The ``__metadata__`` of a safetensors file open at its start (its header only is read)."""
    n = int.from_bytes(fh.read(8), "little")
    return json.loads(fh.read(n)).get("__metadata__") or {}


def _made_by(meta: dict, made_by: dict) -> bool:
    """Whether an entry's metadata agrees with ``made_by`` (what it does not name, it agrees with)."""
    return all(meta.get(k, str(v)) == str(v) for k, v in made_by.items())


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Store:
    """Memory (bounded in bytes) and optionally disk.

    Args:
        max_bytes: memory held at most; the least recently used entries leave first.
        folder: also keep entries here, as ``<folder>/<kind>/<key>.safetensors``.
        pinned: kinds whose entries leave memory only when no entry of another kind is left.

    ``stats`` counts, per kind, ``hit`` (memory), ``disk`` (loaded from disk), ``stale`` (on
    disk, made by other weights) and ``miss``. Thread-safe.

    ``made_by`` (``get``, ``contains``; ``put`` writes it as ``meta``) names what made an
    entry beyond its key, such as the weights' identity (``{"weights": ...}``): an entry on
    disk that names another value is absent (recomputed and written over); one that names
    none (written by an earlier release) is taken, so that its key finds it as before.
    """

    def __init__(self, max_bytes: int = 2 << 30, folder: str | Path | None = None, pinned: tuple[str, ...] = ()):
        self.max_bytes = int(max_bytes)
        self.pinned = frozenset(pinned)  # kinds that leave memory only when no other kind is left (a sweep keeps its posteriors)
        self.folder = Path(folder) if folder is not None else None
        self._mem: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats: Counter = Counter()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: str) -> Path:
        if self.folder is None:
            raise ValueError("this store keeps nothing on disk")
        return self.folder / kind / f"{key}.safetensors"

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)

    def contains(self, kind: str, key: str, made_by: dict | None = None) -> bool:
        """In memory or on disk (of the disk file only its header is read, with ``made_by``)."""
        with self._lock:
            if (kind, key) in self._mem:
                return True
        if self.folder is None or not self.path(kind, key).is_file():
            return False
        if not made_by:
            return True
        try:
            with open(self.path(kind, key), "rb") as fh:
                meta = _header_meta(fh)
        except (OSError, ValueError, AttributeError):
            return False
        return _made_by(meta, made_by)

    def get(self, kind: str, key: str, device=None, made_by: dict | None = None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (on ``device`` when given), or None."""
        with self._lock:
            got = self._mem.get((kind, key))
            if got is not None:
                self._mem.move_to_end((kind, key))
                self.stats[f"{kind}.hit"] += 1
        if got is None and self.folder is not None:
            got = self._read(kind, key, made_by)
            if got is not None:
                self.stats[f"{kind}.disk"] += 1
                if device is not None:
                    got = {k: v.to(device) for k, v in got.items()}
                self._remember(kind, key, got)
        if got is None:
            self.stats[f"{kind}.miss"] += 1
            return None
        return got if device is None else {k: v.to(device) for k, v in got.items()}

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Keep ``tensors`` (detached) in memory and, with a folder, on disk. A tensor that is
        a slice of a larger one (a row of a batch's output) is copied out, so that the entry
        holds only its own bytes and the byte limit counts what memory really holds."""
        tensors = {k: owned(v.detach()) for k, v in tensors.items()}
        self._remember(kind, key, tensors)
        if self.folder is not None:
            self._write(kind, key, tensors, meta or {})

    def name(self, identity: str) -> str | None:
        """The content key (``image_key``) remembered for a picture source's ``identity`` (its
        file's bytes and what is done to them), or None: a stored run finds its pictures'
        keys, and then their maps, without decoding a picture."""
        got = self.get("name", settings_key(identity, {}))
        return None if got is None else bytes(got["key"].tolist()).hex()

    def remember_name(self, identity: str, key: str) -> None:
        self.put("name", settings_key(identity, {}), {"key": torch.tensor(list(bytes.fromhex(key)), dtype=torch.uint8)})

    def drop(self, kind: str) -> None:
        """Forget the in-memory entries of ``kind`` (disk entries stay)."""
        with self._lock:
            for k in [k for k in self._mem if k[0] == kind]:
                self._bytes -= _nbytes(self._mem.pop(k))

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0

    # ---------------------------------------------------------------- internals
    def _remember(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size = _nbytes(tensors)
        with self._lock:
            old = self._mem.pop((kind, key), None)
            if old is not None:
                self._bytes -= _nbytes(old)
            if size > self.max_bytes:
                return
            self._mem[(kind, key)] = tensors
            self._bytes += size
            while self._bytes > self.max_bytes and self._mem:
                victim = next((k for k in self._mem if k[0] not in self.pinned), None) if self.pinned else None
                dropped = self._mem.pop(victim) if victim is not None else self._mem.popitem(last=False)[1]
                self._bytes -= _nbytes(dropped)

    def _read(self, kind: str, key: str, made_by: dict | None = None) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load

        p = self.path(kind, key)
        if not p.is_file():
            return None
        try:
            data = p.read_bytes()  # read into memory: a file replaced later never affects what was returned
            meta = _header_meta(io.BytesIO(data))
            if meta.get("key") != key or meta.get("format") != FORMAT:
                return None
            if made_by and not _made_by(meta, made_by):
                self.stats[f"{kind}.stale"] += 1
                return None
            return load(data)
        except Exception:  # truncated or corrupt: recompute it
            return None

    def _write(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save_file

        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"key": key, "format": FORMAT, "kind": kind, **{k: str(v) for k, v in meta.items()}})
