"""Hand-written prompts: a text template per category, or the empty prompt."""

from __future__ import annotations

import torch

from sd4match.errors import Sd4MatchError
from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import Prompt, PromptConfig, category_words, check_template, register, template_uses_category


@register
class TextPrompt(Prompt):
    """Hand-written text: its template with the pair's category (``a photo of a {category}``),
    through the model's tokenizer and text encoder.

    Category names are worded as the official code words them: PF-Willow's sub-classes lose
    their suffix (``car(G)`` -> "a photo of a car"); underscores are spaces (CUB's
    ``Black_footed_Albatross`` -> "a photo of a Black footed Albatross").
    """

    kind = "text"
    uses_category = True

    def __init__(self, bridge: TextEncoderBridge, template: str = "a photo of a {category}", config: PromptConfig | None = None):
        super().__init__(bridge, config or PromptConfig(kind=self.kind, text_dim=bridge.dim, template=check_template(template), n_tokens=0))
        self.template = self.config.template
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def create(cls, bridge: TextEncoderBridge, *, categories=(), template: str = "", seed: int = 0, **kw) -> "TextPrompt":
        return cls(bridge, template)

    @property
    def requires_category(self) -> bool:
        return template_uses_category(self.template)

    def text_for(self, category: str | None) -> str:
        """The text this prompt encodes for ``category`` (formatted with or without one, so
        ``{{`` and ``}}`` read as braces either way)."""
        return self.template.format(category=category_words(category) if category else "")

    def store_tag(self, category: str) -> str:
        return self.text_for(category)

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        cats = list((batch or {}).get("categories") or [])
        if self.requires_category and not cats:
            raise Sd4MatchError(f"text prompt {self.template!r} needs the categories of the batch")
        texts = [self.text_for(c) for c in cats] if cats else [self.text_for(None)]
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, e in zip(missing, self.bridge.encode_text(missing)):
                self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts])


@register
class EmptyPrompt(TextPrompt):
    """The empty string: (1, 77, D), the same for every pair."""

    kind = "empty"
    uses_category = False

    def __init__(self, bridge: TextEncoderBridge, config: PromptConfig | None = None):
        super().__init__(bridge, "", config or PromptConfig(kind=self.kind, text_dim=bridge.dim, template="", n_tokens=0))

    @classmethod
    def create(cls, bridge: TextEncoderBridge, **ignored) -> "EmptyPrompt":
        return cls(bridge)

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        return super().forward({})
