"""Pair records from SPair-71k, PF-Pascal, PF-Willow and synthetic warps."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from sd4match.data.base import PairDataset
from sd4match.data.images import image_size, load_image
from sd4match.data.pfpascal import PFPascal
from sd4match.data.pfwillow import PFWillow
from sd4match.data.records import PROTOCOLS, PairRecord, pck_bases, read_jsonl, write_jsonl
from sd4match.data.spair import SPair71k
from sd4match.errors import DataError
from sd4match.data.synthetic import SyntheticPairs, WarpConfig, make_pair, render_target

DATASETS: dict[str, type[PairDataset]] = {
    "spair": SPair71k,
    "pfpascal": PFPascal,
    "pfwillow": PFWillow,
    "synthetic": SyntheticPairs,
}


def open_dataset(name: str, root: str | Path, **kwargs: Any) -> PairDataset:
    """The reader of dataset ``name`` (``spair``, ``pfpascal``, ``pfwillow``, ``synthetic``) at ``root``."""
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
    return cls(root, **kwargs)


def load_annotated_image(root: str | Path, rel: str, size) -> Image.Image:
    """Decode ``root / rel`` as RGB and check it has the annotated (W, H)."""
    img = load_image(Path(root) / rel)
    if img.size != tuple(size):
        raise DataError(Path(root) / rel, f"image is {img.width}x{img.height} but the annotation says {size[0]}x{size[1]}")
    return img


@dataclass(frozen=True)
class PictureSource:
    """One side of a pair before decoding: ``identity`` names what the picture is made from
    (the SHA-256 of the file's bytes, the annotated size, and what is done to the pixels:
    mirrored, rendered by a synthetic warp), read without decoding; ``decode()`` makes the
    RGB picture (the annotated size checked)."""

    identity: str
    decode: Callable[[], Image.Image]


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise DataError(path, "image file is missing") from None
    except OSError as e:
        raise DataError(path, f"unreadable ({e.strerror or e})") from None


def pair_sources(root: str | Path, record: PairRecord) -> tuple[PictureSource, PictureSource]:
    """The two pictures of ``record``, named by their files' bytes and undecoded (a missing
    file raises ``DataError`` naming it). Synthetic targets are rendered from the record's
    warp; mirrored records (``PairRecord.mirrored``) come back mirrored."""
    root = Path(root)
    syn, mirrored = record.meta.get("synthetic"), bool(record.meta.get("mirrored"))
    src_digest = _file_digest(root / record.src)
    trg_digest = src_digest if syn is not None else _file_digest(root / record.trg)
    decoded: dict[str, Image.Image] = {}

    def src_image() -> Image.Image:  # decoded once for both sides of a synthetic pair
        if "src" not in decoded:
            decoded["src"] = load_annotated_image(root, record.src, record.src_size)
        return decoded["src"]

    def trg_image() -> Image.Image:
        if syn is not None:
            return render_target(src_image(), np.asarray(syn["homography"]), syn["color"])
        return load_annotated_image(root, record.trg, record.trg_size)

    def side(digest, size, make, warp=None):
        what = json.dumps({"size": list(size), "mirrored": mirrored, "synthetic": warp}, sort_keys=True, default=str)
        return PictureSource(f"{digest}:{what}", (lambda: ImageOps.mirror(make())) if mirrored else make)

    return side(src_digest, record.src_size, src_image), side(trg_digest, record.trg_size, trg_image, syn)


def load_pair_images(root: str | Path, record: PairRecord) -> tuple[Image.Image, Image.Image]:
    """Decode the source and target images of ``record`` as RGB.

    Synthetic targets are rendered from the record's warp; mirrored records
    (``PairRecord.mirrored``) come back mirrored.
    """
    src, trg = pair_sources(root, record)
    return src.decode(), trg.decode()


__all__ = [
    "DATASETS", "PROTOCOLS", "PFPascal", "PFWillow", "PairDataset", "PairRecord", "PictureSource", "SPair71k",
    "SyntheticPairs", "WarpConfig", "image_size", "load_image", "load_pair_images", "make_pair",
    "open_dataset", "pair_sources", "pck_bases", "read_jsonl", "write_jsonl",
]
