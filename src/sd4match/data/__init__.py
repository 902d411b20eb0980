"""Pair records from SPair-71k, SPair-U, PF-Pascal, PF-Willow, AP-10K, CUB-200-2011, MP-100, synthetic warps and your own pair lists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from sd4match.data.ap10k import AP10K, prepare_ap10k
from sd4match.data.base import PairDataset
from sd4match.data.cub import CUB200
from sd4match.data.custom import CustomPairs
from sd4match.data.images import image_size, load_image
from sd4match.data.pfpascal import PFPascal
from sd4match.data.mp100 import MP100
from sd4match.data.pfwillow import PFWillow
from sd4match.data.records import PROTOCOLS, PairRecord, pck_bases, read_jsonl, write_jsonl
from sd4match.data.spair import SPair71k, SPairU
from sd4match.config import dataset_name
from sd4match.errors import DataError
from sd4match.fileio import file_sha256
from sd4match.data.synthetic import SyntheticPairs, WarpConfig, make_pair, render_target

DATASETS: dict[str, type[PairDataset]] = {
    "spair": SPair71k,
    "spair-u": SPairU,
    "pfpascal": PFPascal,
    "pfwillow": PFWillow,
    "ap10k": AP10K,
    "cub": CUB200,
    "mp100": MP100,
    "synthetic": SyntheticPairs,
    "custom": CustomPairs,
}
#: reader options and their command-line flags (``PairDataset.options`` says which reader takes which)
OPTION_FLAGS = {"images": "--images", "all_pairs": "--all-pairs"}


def dataset_options(obj: Any) -> dict[str, Any]:
    """The reader options on ``obj`` (a config or parsed flags): ``images``, ``all_pairs``
    (``open_dataset`` drops those that are unset)."""
    return {k: getattr(obj, k, None) for k in OPTION_FLAGS}


def open_dataset(name: str, root: str | Path, **options: Any) -> PairDataset:
    """The reader of dataset ``name`` (a key of ``DATASETS``) at ``root``, with its own
    ``options`` (``images`` for SPair-U, ``all_pairs`` for CUB); an option the reader does not
    take is refused in one line."""
    name = dataset_name(name)  # "PF-Willow", "SPair-71k" as well
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
    options = {k: v for k, v in options.items() if v not in (None, False, "")}
    wrong = [k for k in options if k not in cls.options and k in OPTION_FLAGS]
    if wrong:
        takers = sorted(n for n, c in DATASETS.items() if wrong[0] in c.options)
        raise DataError(root, f"{OPTION_FLAGS[wrong[0]]} is for --dataset {' or '.join(takers)}, not {name}")
    return cls(root, **options)


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
        return file_sha256(path)
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
    "AP10K", "CUB200", "CustomPairs", "DATASETS", "MP100", "OPTION_FLAGS", "PROTOCOLS", "PFPascal", "PFWillow", "PairDataset", "PairRecord", "PictureSource", "SPair71k", "SPairU",
    "SyntheticPairs", "WarpConfig", "image_size", "load_image", "load_pair_images", "make_pair",
    "dataset_options", "open_dataset", "pair_sources", "prepare_ap10k", "pck_bases", "read_jsonl", "write_jsonl",
]
