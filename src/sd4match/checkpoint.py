"""Checkpoints of a training run, and the random state they carry.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXX`` holding ``state.safetensors``
(the prompt's tensors, the optimiser's state, torch's RNG state) and ``state.json`` (step,
settings, optimiser groups, numpy's and Python's RNG states). It is written into a
temporary folder, fsynced and renamed, so a crash never leaves a half-written one; a
damaged one is named in one line when read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save_file

from sd4match.errors import Sd4MatchError, first_line
from sd4match.runtime import hang_for_tests

CKPT_DIR = "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, prompt, optimizer, state: dict, extra: dict | None = None) -> Path:
    """Write ``checkpoints/step-XXXXXXX`` atomically: a temporary folder, fsync, rename.
    ``extra``: more modules whose tensors are kept (``{"adapter": adapter}``)."""
    ckpts = folder / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:07d}"
    tmp = ckpts / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"prompt.{k}": v.detach().cpu().contiguous() for k, v in prompt.state_dict().items()}
    for name, mod in (extra or {}).items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in mod.state_dict().items()})
    osd = optimizer.state_dict()
    for idx, st in osd["state"].items():
        for name, val in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {**state, "step": step, "param_groups": osd["param_groups"], "rng": {"numpy": _np_state(), "python": _py_state()}}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    hang_for_tests(folder, f"ckpt:{step}")  # fault injection for tests: a kill in the middle of a write
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckpts)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a crashed write are ignored)."""
    ckpts = Path(folder) / CKPT_DIR
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file() and (p / "state.safetensors").is_file())


def prune_checkpoints(folder: Path, keep: int) -> None:
    ckpts = Path(folder) / CKPT_DIR
    for p in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpts.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, prompt, optimizer, extra: dict | None = None) -> dict:
    """Restore the prompt, the optimiser and every RNG from ``path``; return its ``state.json``."""
    try:
        tensors = load((path / "state.safetensors").read_bytes())
        meta = json.loads((path / "state.json").read_text())
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read checkpoint ({first_line(e)})") from None
    try:
        prompt.load_state_dict({k[len("prompt."):]: v for k, v in tensors.items() if k.startswith("prompt.")}, strict=True)
    except RuntimeError as e:
        raise Sd4MatchError(f"{path}: does not fit this prompt ({str(e).splitlines()[-1].strip()})") from None
    for name, mod in (extra or {}).items():
        try:
            mod.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}, strict=True)
        except RuntimeError as e:
            raise Sd4MatchError(f"{path}: does not fit this run's {name} ({str(e).splitlines()[-1].strip()})") from None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(_np_unstate(meta["rng"]["numpy"]))
    random.setstate(_py_unstate(meta["rng"]["python"]))
    return meta


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_unstate(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _py_unstate(s):
    return (s[0], tuple(s[1]), s[2])


def read_checkpoint_meta(path: Path) -> dict:
    """A checkpoint's ``state.json``, checked to load; one-line error otherwise."""
    try:
        meta = json.loads((path / "state.json").read_text())
        int(meta["step"]), meta["config"]
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read checkpoint ({first_line(e)})") from None
    return meta
