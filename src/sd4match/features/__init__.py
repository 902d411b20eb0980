"""The models: featurizers (Stable Diffusion, the method; DINOv2; SD + DINOv2 fused;
EfficientNet-Lite0, offline and real), the text-encoder bridge prompts use, and the
weights registry. Nothing here knows prompts, the store, the datasets or the stages."""

from __future__ import annotations

import json
from pathlib import Path

from sd4match.errors import Sd4MatchError
from sd4match.features.base import CellMap, Featurizer, images_to_tensor
from sd4match.features.dino import DinoFeaturizer
from sd4match.features.effnet import EffNetFeaturizer
from sd4match.features.fused import FusedFeaturizer
from sd4match.features.registry import REGISTRY, resolve
from sd4match.features.sd import SDFeaturizer, SDFeaturizerConfig
from sd4match.features.text import TextEncoderBridge


def split_fused(model: str | Path) -> tuple[str, str] | None:
    """``"SD+DINO"`` (any SD source, then a DINOv2 source) -> (sd, dino); None for one model."""
    text = str(model)
    if "+" not in text:
        return None
    sd, dino = text.rsplit("+", 1)
    try:
        if not _is_dinov2(resolve(dino)):
            return None
    except Sd4MatchError:
        return None
    if not sd.strip():
        raise Sd4MatchError(f"{text}: no Stable Diffusion model before '+' (e.g. sd-2-1+{dino})")
    first = resolve(sd)
    if first.kind == "builtin" or _is_dinov2(first):
        raise Sd4MatchError(f"{text}: {sd} is not a Stable Diffusion model; a fusion is SD+DINOv2 (e.g. sd-2-1+{dino}), or give {sd} alone")
    return sd, dino


def load_featurizer(model: str | Path, *, dino_input: str = "official", dino_pos: str = "official", **kwargs) -> Featurizer:
    """The featurizer for ``model``: ``effnet-lite0``; a DINOv2 source (the matching
    backbone, squashed to ``resolution``, default 840); any Stable Diffusion source; or
    ``SD+DINOv2`` (e.g. ``sd-2-1+dinov2-b``): the fusion of both (``FusedFeaturizer``).

    Keyword arguments go to the featurizer's ``from_pretrained``; settings a featurizer
    does not have (timestep, ensemble, ...) are ignored by it.
    """
    fused = split_fused(model)
    if fused is not None:
        sd = SDFeaturizer.from_pretrained(fused[0], **kwargs)
        net, dino_id = DinoFeaturizer.load_model(fused[1], local_files_only=kwargs.get("local_files_only"))
        return FusedFeaturizer(sd, net, dino_input=dino_input, dino_id=dino_id, dino_pos=dino_pos)
    res = resolve(model)
    if res.kind == "builtin" and res.name == "effnet-lite0":
        return EffNetFeaturizer.from_pretrained(**{k: v for k, v in kwargs.items() if k in ("resolution", "max_batch")})
    if _is_dinov2(res):
        return DinoFeaturizer.from_pretrained(model, resolution=kwargs.get("resolution") or 840, local_files_only=kwargs.get("local_files_only"),
                                           pos=dino_pos)
    return SDFeaturizer.from_pretrained(model, **kwargs)


def sd_source(model: str | Path) -> str | None:
    """The Stable Diffusion source ``load_featurizer(model)`` would load (the SD part of a
    fused ``SD+DINOv2``); None for effnet-lite0 and DINOv2. Nothing is loaded."""
    fused = split_fused(model)
    if fused is not None:
        return fused[0]
    res = resolve(model)
    return None if res.kind == "builtin" or _is_dinov2(res) else str(model)


def sd_limits(source: str) -> tuple[int, int] | None:
    """(number of UNet up blocks, training timesteps) of a Stable Diffusion source, read from
    its configs without loading it: a diffusers folder's own, or a hub model's in the local
    hub cache (the registry's SD 2.1 and 1.5: 4 and 1000 when not cached); None when they
    cannot be told (a single checkpoint file, an uncached hub model)."""
    res = resolve(source)
    unet, sched = (_read_json(_local_file(res, part)) for part in ("unet/config.json", "scheduler/scheduler_config.json"))
    if unet is not None and sched is not None:
        return len(unet.get("up_block_types") or ()), int(sched.get("num_train_timesteps", 1000))
    return (4, 1000) if res.name is not None and REGISTRY[res.name].family == "sd" else None


def _is_dinov2(res) -> bool:
    """Whether ``res`` names DINOv2 weights: a registry DINOv2, a transformers folder whose
    config says so, or a hub id whose cached config says so (uncached: whose name holds
    ``dinov2``, as ``facebook/dinov2-base`` does)."""
    if res.name is not None:
        return REGISTRY[res.name].family == "dinov2"
    cfg = _local_file(res, "config.json")
    if cfg is None:
        return res.kind == "hub" and "dinov2" in res.location.rsplit("/", 1)[-1].lower()
    return (_read_json(cfg) or {}).get("model_type") == "dinov2"


def _local_file(res, part: str) -> Path | None:
    """The file ``part`` of a folder's or a hub model's weights, as this machine has it (the
    folder's own, or the hub cache's), without contacting the hub; None where it is not here."""
    if res.kind == "folder":
        path = Path(res.location) / part
    elif res.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(res.location, part, revision=res.revision)
        path = Path(found) if isinstance(found, str) else None
    else:
        return None
    return path if path is not None and path.is_file() else None


def _read_json(path: Path | None) -> dict | None:
    """A config file's JSON object, or None (no file, or not readable JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None


__all__ = ["CellMap", "DinoFeaturizer", "EffNetFeaturizer", "Featurizer", "FusedFeaturizer", "REGISTRY", "SDFeaturizer", "SDFeaturizerConfig",
           "TextEncoderBridge", "images_to_tensor", "load_featurizer", "resolve", "sd_limits", "sd_source", "split_fused"]
