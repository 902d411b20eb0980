"""Prompts for the UNet's cross-attention: text, empty, learned (single, per category), CPM."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sd4match.errors import Sd4MatchError
from sd4match.prompts.base import PROMPT_KINDS, N_TOKENS, Prompt, PromptConfig, PromptKind, TextEncoderBridge, read_prompt_config, read_prompt_tensors
from sd4match.prompts.cpm import ConditionalPrompt
from sd4match.prompts.learned import CategoryPrompt, SinglePrompt
from sd4match.prompts.text import EmptyPrompt, TextPrompt

PROMPT_CLASSES: dict[str, type[Prompt]] = {
    "text": TextPrompt, "empty": EmptyPrompt, "single": SinglePrompt, "category": CategoryPrompt, "cpm": ConditionalPrompt,
}


def bridge_for(featurizer) -> TextEncoderBridge:
    """The text-encoder bridge of an ``SDFeaturizer``."""
    return TextEncoderBridge(featurizer.text_encoder, featurizer.tokenizer)


def make_prompt(kind: str, featurizer, *, categories: Sequence[str] = (), template: str = "a photo of a {category}", seed: int = 0, **kw) -> Prompt:
    """A new prompt of ``kind`` for the featurizer's text encoder."""
    if kind not in PROMPT_CLASSES:
        raise Sd4MatchError(f"unknown prompt kind {kind!r}; expected one of {', '.join(PROMPT_KINDS)}")
    b = bridge_for(featurizer)
    if kind == "text":
        return TextPrompt(b, template)
    if kind == "empty":
        return EmptyPrompt(b)
    if kind == "single":
        return SinglePrompt(b, seed=seed, **kw)
    if kind == "category":
        return CategoryPrompt(b, categories, seed=seed, **kw)
    return ConditionalPrompt(b, seed=seed, **kw)


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
    prompt = PROMPT_CLASSES[cfg.kind](b, config=cfg)
    tensors = read_prompt_tensors(folder)
    try:
        prompt.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise Sd4MatchError(f"{Path(folder) / 'prompt.safetensors'}: does not fit its config.json ({str(e).splitlines()[-1].strip()})") from None
    return prompt


def prompt_fingerprint(prompt) -> str:
    """A name for a prompt's content (store keys): its kind, template or categories, and the
    SHA-256 of its tensors; ``none`` for featurizers without prompts."""
    import hashlib
    import json
    from dataclasses import asdict

    if prompt is None:
        return "none"
    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(prompt.config).items() if k != "training"}, sort_keys=True, default=str).encode())
    for k, v in prompt.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{prompt.kind}:{h.hexdigest()[:24]}"


__all__ = [
    "CategoryPrompt", "ConditionalPrompt", "EmptyPrompt", "N_TOKENS", "PROMPT_KINDS", "Prompt", "PromptConfig", "PromptKind",
    "SinglePrompt", "TextEncoderBridge", "TextPrompt", "bridge_for", "load_prompt", "make_prompt", "prompt_fingerprint",
]
