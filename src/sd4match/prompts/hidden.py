"""HiddenState prompts (the official ``--learn_hidden_state``): the 77 rows of CLIP's
*output*, learned directly and used as ``encoder_hidden_states`` with no CLIP pass
(official sd_feature_extractor.py:87-89). ``hidden``: one for everything (the official
Single_..._HiddenState); ``hidden-category``: one per category (Class_..._HiddenState).
Initialised as the official code does: U[0, 1) draws, (1, 77, D) each.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sd4match.errors import Sd4MatchError
from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import Prompt, PromptConfig, register
from sd4match.prompts.learned import CategoryPrompt


@register
class HiddenPrompt(Prompt):
    """77 learned rows of CLIP output, one prompt for every pair.

    Shape:
        returns (1, 77, D), the parameter itself.
    """

    kind = "hidden"
    learned = True

    def __init__(self, bridge: TextEncoderBridge, *, seed: int = 0, config: PromptConfig | None = None, **ignored):
        super().__init__(bridge, config or PromptConfig(kind=self.kind, text_dim=bridge.dim, n_tokens=bridge.length, seed=seed))
        g = torch.Generator().manual_seed(self.config.seed)
        self.states = nn.Parameter(torch.rand(1, bridge.length, bridge.dim, generator=g))

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        return self.states


@register
class HiddenCategoryPrompt(Prompt):
    """77 learned rows of CLIP output per category; a pair uses its category's (looked up as
    a ``category`` prompt looks it up: base name, then the PF-Willow aliases).

    Shape:
        returns (B, 77, D) for the B categories of the batch.
    """

    kind = "hidden-category"
    learned = True
    uses_category = True

    def __init__(self, bridge: TextEncoderBridge, categories: Sequence[str] = (), *, seed: int = 0, config: PromptConfig | None = None, **ignored):
        if config is None:
            cats = sorted(dict.fromkeys(categories))
            if not cats:
                raise Sd4MatchError("a hidden-category prompt needs the list of categories")
            config = PromptConfig(kind=self.kind, text_dim=bridge.dim, n_tokens=bridge.length, categories=cats, seed=seed)
        super().__init__(bridge, config)
        self.index = {c: i for i, c in enumerate(self.config.categories)}
        g = torch.Generator().manual_seed(self.config.seed)
        self.states = nn.Parameter(torch.rand(len(self.index), bridge.length, bridge.dim, generator=g))

    @classmethod
    def create(cls, bridge: TextEncoderBridge, *, categories=(), template: str = "", seed: int = 0, **kw) -> "HiddenCategoryPrompt":
        return cls(bridge, categories, seed=seed, **kw)

    lookup = CategoryPrompt.lookup

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        cats = list((batch or {}).get("categories") or [])
        if not cats:
            raise Sd4MatchError("a hidden-category prompt needs the categories of the batch")
        return self.states[torch.tensor([self.lookup(c) for c in cats], device=self.states.device)]
