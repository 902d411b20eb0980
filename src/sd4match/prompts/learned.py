"""Learned token prompts: one for everything (Single), or one per category (Class).

The learnable tensor holds CLIP *embedding-layer outputs* (token + position embedding),
as in the official code: the n = 75 rows sit at positions 1 ... n and are initialised
with the embedding-layer outputs of n random vocabulary ids there; the BOS row (position
0) and EOS row (position n + 1) are fixed (``ends``, saved with the prompt so an imported
official prompt is used exactly as released).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sd4match.config import category_names
from sd4match.errors import Sd4MatchError
from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import N_TOKENS, Prompt, PromptConfig, register

@register
class SinglePrompt(Prompt):
    """75 learnable embedding-layer rows, one prompt for every pair.

    Shape:
        returns (1, 77, D).
    """

    kind = "single"
    learned = True

    def __init__(self, bridge: TextEncoderBridge, *, n_tokens: int = N_TOKENS, seed: int = 0, config: PromptConfig | None = None):
        super().__init__(bridge, config or PromptConfig(kind=self.kind, text_dim=bridge.dim, n_tokens=n_tokens, seed=seed))
        n = self.config.n_tokens
        g = torch.Generator().manual_seed(self.config.seed)
        self.tokens = nn.Parameter(bridge.random_rows(1, n, g))
        self.register_buffer("ends", bridge.end_rows(n))

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        return self.bridge.encode_rows(self.tokens, self.ends)


@register
class CategoryPrompt(Prompt):
    """One 75-row prompt per category; a pair uses its category's prompt.

    Categories unknown to the prompt are looked up by their base name (``car(G)`` ->
    ``car``) and then through ``config.CATEGORY_ALIASES`` (PF-Willow -> PF-Pascal classes).

    Shape:
        returns (B, 77, D) for the B categories of the batch.
    """

    kind = "category"
    learned = True
    uses_category = True

    def __init__(self, bridge: TextEncoderBridge, categories: Sequence[str] = (), *, n_tokens: int = N_TOKENS, seed: int = 0, config: PromptConfig | None = None):
        if config is None:
            cats = sorted(dict.fromkeys(categories))
            if not cats:
                raise Sd4MatchError("a category prompt needs the list of categories")
            config = PromptConfig(kind=self.kind, text_dim=bridge.dim, n_tokens=n_tokens, categories=cats, seed=seed)
        super().__init__(bridge, config)
        self.index = {c: i for i, c in enumerate(self.config.categories)}
        n = self.config.n_tokens
        g = torch.Generator().manual_seed(self.config.seed)
        self.tokens = nn.Parameter(bridge.random_rows(len(self.index), n, g))
        self.register_buffer("ends", bridge.end_rows(n).expand(len(self.index), -1, -1).clone())

    @classmethod
    def create(cls, bridge: TextEncoderBridge, *, categories=(), template: str = "", seed: int = 0, **kw) -> "CategoryPrompt":
        return cls(bridge, categories, seed=seed, **kw)

    def lookup(self, category: str) -> int:
        """The row of ``category``: itself, its base name, or its alias."""
        for name in category_names(category):
            if name in self.index:
                return self.index[name]
        raise Sd4MatchError(f"category {category!r} has no learned prompt; this prompt knows {', '.join(self.index)}")

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        cats = list((batch or {}).get("categories") or [])
        if not cats:
            raise Sd4MatchError("a category prompt needs the categories of the batch")
        idx = torch.tensor([self.lookup(c) for c in cats], device=self.tokens.device)
        return self.bridge.encode_rows(self.tokens[idx], self.ends[idx])
