"""Featurizers: Stable Diffusion (the method), EfficientNet-Lite0 (offline, real), and the cache."""

from __future__ import annotations

from pathlib import Path

from sd4match.features.base import CellMap, Featurizer, images_to_tensor
from sd4match.features.dino import DinoFeaturizer
from sd4match.features.effnet import EffNetFeaturizer
from sd4match.features.registry import REGISTRY, resolve
from sd4match.features.sd import SDFeaturizer, SDFeaturizerConfig


def load_featurizer(model: str | Path, **kwargs) -> Featurizer:
    """The featurizer for ``model``: ``effnet-lite0``, or any Stable Diffusion source.

    Keyword arguments go to the featurizer's ``from_pretrained``; SD-only settings
    (timestep, up_block, ensemble, ...) are ignored by ``effnet-lite0``.
    """
    res = resolve(model)
    if res.kind == "builtin" and res.name == "effnet-lite0":
        return EffNetFeaturizer.from_pretrained(**{k: v for k, v in kwargs.items() if k in ("resolution", "max_batch")})
    if _is_dinov2(res):
        return DinoFeaturizer.from_pretrained(model, **{k: v for k, v in kwargs.items() if k == "local_files_only"})
    return SDFeaturizer.from_pretrained(model, **kwargs)


def _is_dinov2(res) -> bool:
    import json

    if res.name is not None:
        return REGISTRY[res.name].family == "dinov2"
    cfg = Path(res.location) / "config.json"
    if res.kind == "folder" and cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("model_type") == "dinov2"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


__all__ = ["CellMap", "DinoFeaturizer", "EffNetFeaturizer", "Featurizer", "REGISTRY", "SDFeaturizer", "SDFeaturizerConfig", "images_to_tensor", "load_featurizer", "resolve"]
