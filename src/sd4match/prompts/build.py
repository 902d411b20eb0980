"""Making, loading and naming prompts for a featurizer's text encoder."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from sd4match.errors import Sd4MatchError, Sd4MatchWarning
from sd4match.features.adapters import has_adapter, load_adapter
from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import Prompt, prompt_class, read_prompt_config, read_prompt_tensors
from sd4match.prompts.spec import DEFAULT_TEMPLATE, PromptSpec, parse_prompt


def bridge_for(featurizer) -> TextEncoderBridge:
    """The text-encoder bridge of a featurizer that takes prompts (``featurizer.text_bridge``)."""
    return featurizer.text_bridge


def make_prompt(kind: str, featurizer, *, categories: Sequence[str] = (), template: str = DEFAULT_TEMPLATE, seed: int = 0, **kw) -> Prompt:
    """A new prompt of ``kind`` for the featurizer's text encoder.

    Args:
        kind: a registered kind (``text``, ``empty``, ``single``, ``category``, ``cpm``).
        categories: the categories of a per-category prompt.
        template: the template of a ``text`` prompt.
        seed: seeds the initial values of a learned prompt.
        **kw: what the kind takes besides (``n_tokens``; CPM: ``dino_dim``, ``n_patches``,
            ``n_global``, ``n_cond``, ``dino_model``).
    """
    return prompt_class(kind).create(bridge_for(featurizer), categories=categories, template=template, seed=seed, **kw)


def load_prompt(folder: str | Path, featurizer) -> Prompt:
    """Load a saved prompt folder for ``featurizer``'s text encoder, bit-exact.

    Raises:
        Sd4MatchError: not a prompt folder, corrupt weights, or a prompt made for a text
            encoder of another width.
    """
    cfg = read_prompt_config(folder)
    b = bridge_for(featurizer)
    if cfg.text_dim != b.dim:
        raise Sd4MatchError(
            f"{folder}: prompt was made for a {cfg.text_dim}-d text encoder ({cfg.model or 'unknown model'}), "
            f"but {featurizer.model_id} has a {b.dim}-d one"
        )
    if cfg.model and prompt_class(cfg.kind).learned and cfg.model != featurizer.model_id:
        warnings.warn(f"{folder}: this prompt was made for {cfg.model}, but is used with {featurizer.model_id} (same text width; "
                      f"its features may not be what it learned)", Sd4MatchWarning, stacklevel=2)
    prompt = prompt_class(cfg.kind)(b, config=cfg)
    tensors = read_prompt_tensors(folder)
    try:
        prompt.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise Sd4MatchError(f"{Path(folder) / 'prompt.safetensors'}: does not fit its config.json ({str(e).splitlines()[-1].strip()})") from None
    return prompt


def resolve_prompt(spec: str | PromptSpec, featurizer, *, dino=None) -> Prompt | None:
    """The prompt a ``--prompt`` string names, for ``featurizer`` (None when the featurizer
    takes no prompt). A prompt folder that holds a UNet adapter (``adapter.safetensors``)
    puts it on the featurizer (``use_adapter``); one without takes the featurizer's off.

    Args:
        spec: ``empty``, ``text``, ``text:<template>``, a prompt folder, or a ``PromptSpec``.
        featurizer: any featurizer; one that takes no prompt accepts only ``empty``.
        dino: the DINOv2 featurizer, required by kinds that ``needs_dino``.
    """
    name = spec if isinstance(spec, str) else str(spec.folder or spec.kind)
    spec = parse_prompt(spec)
    if not featurizer.takes_prompt:
        if spec.kind != "empty":
            raise Sd4MatchError(f"{featurizer.model_id} takes no prompt; use --prompt empty")
        return None
    if spec.folder is None:
        return make_prompt(spec.kind, featurizer, template=spec.template or "")
    if spec.needs_dino and dino is None:
        raise Sd4MatchError(f"{name}: a {spec.kind} prompt needs DINOv2 features (--dino)")
    prompt = load_prompt(spec.folder, featurizer)
    # the folder may hold a UNet adapter trained with the prompt (train --adapt lora / finetune)
    if featurizer.adapts:
        featurizer.use_adapter(load_adapter(spec.folder, featurizer.unet) if has_adapter(spec.folder) else None)
    elif has_adapter(spec.folder):
        raise Sd4MatchError(f"{name}: holds a UNet adapter, but {featurizer.model_id} has no UNet")
    return prompt


def prompt_fingerprint(prompt: Prompt | None) -> str:
    """A name for a prompt's content (store keys): its kind, template or categories, and the
    SHA-256 of its tensors; ``none`` for featurizers without prompts."""
    if prompt is None:
        return "none"
    late = {"cpm_input", "cpm_plain"}  # fields added later: absent (None) they leave earlier fingerprints (and stored maps) as they were
    cfg = {k: v for k, v in asdict(prompt.config).items() if k != "training" and not (k in late and v is None)}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for k, v in prompt.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{prompt.kind}:{h.hexdigest()[:24]}"
