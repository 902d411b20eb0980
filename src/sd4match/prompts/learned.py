"""Learned token prompts: one for everything, or one per category."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sd4match.errors import Sd4MatchError
from sd4match.prompts.base import N_TOKENS, Prompt, PromptConfig, TextEncoderBridge


class SinglePrompt(Prompt):
    """75 learnable CLIP token embeddings, one prompt for every pair.

    Shape:
        returns (1, 77, D).
    """

    kind = "single"

    def __init__(self, bridge: TextEncoderBridge, *, n_tokens: int = N_TOKENS, seed: int = 0, config: PromptConfig | None = None):
        super().__init__(bridge, config or PromptConfig(kind="single", text_dim=bridge.dim, n_tokens=n_tokens, seed=seed))
        g = torch.Generator().manual_seed(self.config.seed)
        self.tokens = nn.Parameter(bridge.random_vocab_embeddings((1, self.config.n_tokens), g))

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        return self.bridge.encode_tokens(self.tokens)


class CategoryPrompt(Prompt):
    """One 75-token prompt per category; a pair uses its category's prompt.

    Shape:
        returns (B, 77, D) for the B categories of the batch.
    """

    kind = "category"

    def __init__(self, bridge: TextEncoderBridge, categories: Sequence[str] = (), *, n_tokens: int = N_TOKENS, seed: int = 0, config: PromptConfig | None = None):
        if config is None:
            cats = sorted(dict.fromkeys(categories))
            if not cats:
                raise Sd4MatchError("a category prompt needs the list of categories")
            config = PromptConfig(kind="category", text_dim=bridge.dim, n_tokens=n_tokens, categories=cats, seed=seed)
        super().__init__(bridge, config)
        self.index = {c: i for i, c in enumerate(self.config.categories)}
        g = torch.Generator().manual_seed(self.config.seed)
        self.tokens = nn.Parameter(bridge.random_vocab_embeddings((len(self.index), self.config.n_tokens), g))

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        cats = list((batch or {}).get("categories") or [])
        if not cats:
            raise Sd4MatchError("a category prompt needs the categories of the batch")
        unknown = [c for c in cats if c not in self.index]
        if unknown:
            raise Sd4MatchError(f"category {unknown[0]!r} has no learned prompt; this prompt knows {', '.join(self.index)}")
        idx = torch.tensor([self.index[c] for c in cats], device=self.tokens.device)
        return self.bridge.encode_tokens(self.tokens[idx])
