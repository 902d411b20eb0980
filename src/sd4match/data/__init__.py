"""Pair records from SPair-71k, PF-Pascal, PF-Willow and synthetic warps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def load_pair_images(root: str | Path, record: PairRecord) -> tuple[Image.Image, Image.Image]:
    """Decode the source and target images of ``record`` as RGB.

    Synthetic targets are rendered from the record's warp; mirrored records
    (``PairRecord.mirrored``) come back mirrored.
    """
    root = Path(root)
    src = load_annotated_image(root, record.src, record.src_size)
    syn = record.meta.get("synthetic")
    if syn is not None:
        trg = render_target(src, np.asarray(syn["homography"]), syn["color"])
    else:
        trg = load_annotated_image(root, record.trg, record.trg_size)
    if record.meta.get("mirrored"):
        src, trg = ImageOps.mirror(src), ImageOps.mirror(trg)
    return src, trg


__all__ = [
    "DATASETS", "PROTOCOLS", "PFPascal", "PFWillow", "PairDataset", "PairRecord", "SPair71k",
    "SyntheticPairs", "WarpConfig", "image_size", "load_image", "load_pair_images", "make_pair",
    "open_dataset", "pck_bases", "read_jsonl", "write_jsonl",
]
