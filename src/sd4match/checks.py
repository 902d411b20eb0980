"""Input checks that run before any model loads: each names the first problem in one line.

Every command validates what it was given (pictures, points files, dataset root and
layout, prompt folder, device, output folder, model source) in seconds, so a typo never
costs a model load or a download attempt.
"""

from __future__ import annotations

from pathlib import Path

from sd4match.errors import Sd4MatchError


def check_device(name: str):
    """The torch device ``name`` names, or a one-line refusal naming what is available."""
    from sd4match.runtime import pick_device

    return pick_device(name)


def check_picture(path: str | Path, *, decode: bool = True) -> tuple[int, int]:
    """A readable picture of at least 2 x 2: decoded in full (a truncated file is found), or
    with ``decode=False`` from its header only. Returns its stored (W, H)."""
    from sd4match.data.images import image_size, load_image

    if decode:
        return load_image(path).size
    return image_size(path)


def check_model(model: str) -> None:
    """``--model`` names something that can exist (registry name, hub id, folder or file, or
    ``SD+DINOv2``)."""
    from sd4match.features import split_fused
    from sd4match.features.registry import resolve

    for part in split_fused(model) or (model,):
        resolve(part)


def check_prompt(spec: str) -> str | None:
    """``empty``, ``text``/``text:<words>`` or a readable prompt folder; returns the folder's kind."""
    if spec in ("empty", "none", "text") or spec.startswith("text:"):
        return None
    folder = Path(spec)
    if not folder.is_dir():
        raise Sd4MatchError(f"--prompt {spec}: not a prompt folder, 'empty', 'text' or 'text:<words>'")
    from sd4match.prompts.base import read_prompt_config, read_prompt_tensors

    cfg = read_prompt_config(folder)
    if cfg.kind in ("single", "category", "cpm"):
        read_prompt_tensors(folder)
    return cfg.kind


def check_output_folder(out: str | Path) -> Path:
    """``out`` is a folder (or can be made): not an existing file, its parent writable."""
    import os

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Sd4MatchError(f"--out {out}: exists and is not a folder")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise Sd4MatchError(f"--out {out}: {parent} is not writable")
    return out


def check_dataset(name: str, root: str | Path, splits) -> dict:
    """Open the dataset and read the pair lists of ``splits``: {split: records}."""
    from sd4match.data import open_dataset

    ds = open_dataset(name, root)
    return {s: ds.pairs(s) for s in splits}
