"""Conditional Prompting Module (CPM, Pair-DINO-Feat G25-C50), as the official code builds it.

concat(src, trg) DINOv2 patch tokens (B, 256, 2C) -> ``linear_C`` (2C -> D) -> ``linear_N``
(256 -> 256, across patches) -> adaptive max-pool over patches to 50 -> +
``positional_embedding`` (1, 50, D) -> x tanh(``alpha_cond``), an element-wise gate
(1, 50, D). The prompt sequence is [BOS row, 25 ``global_embeds``, the 50 conditional
rows, EOS row at position 76]: the learned and conditional rows get no CLIP position
embedding. ``global_embeds``, ``positional_embedding`` and ``alpha_cond`` start as
U[0, 1) draws; the linear layers have PyTorch's default initialisation. One prompt for
both images of a pair. Parameter names equal the official state dict's keys. Other
lengths are settings (``n_global``, ``n_cond``); with ``n_global = 0`` (the official G0)
there is no ``global_embeds``, as in the official module.
"""

from __future__ import annotations

import torch
from torch import nn

from sd4match.errors import Sd4MatchError
from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import Prompt, PromptConfig, register


@register
class ConditionalPrompt(Prompt):
    """CPM.

    Shape:
        batch["dino_src"], batch["dino_trg"]: (B, P, C) patch tokens -> (B, 77, D).
    """

    kind = "cpm"
    learned = True
    per_pair = True  # built from both images: one prompt per pair
    needs_dino = True

    def __init__(
        self,
        bridge: TextEncoderBridge,
        *,
        dino_dim: int = 768,
        n_patches: int = 256,
        n_global: int = 25,
        n_cond: int = 50,
        seed: int = 0,
        dino_model: str | None = None,
        config: PromptConfig | None = None,
    ):
        if config is None:
            config = PromptConfig(kind=self.kind, text_dim=bridge.dim, n_tokens=n_global + n_cond, n_global=n_global, n_cond=n_cond,
                                  dino_dim=dino_dim, n_patches=n_patches, seed=seed, dino_model=dino_model)
        super().__init__(bridge, config)
        c, d = self.config, bridge.dim
        if c.n_global + c.n_cond > bridge.length - 2:
            raise Sd4MatchError(f"n_global + n_cond must be at most {bridge.length - 2}, got {c.n_global + c.n_cond}")
        if c.n_cond < 1 or c.n_global < 0:
            raise Sd4MatchError(f"a CPM needs at least 1 conditional row and no negative global count, got {c.n_global} + {c.n_cond}")
        g = torch.Generator().manual_seed(c.seed)
        self.global_embeds = nn.Parameter(torch.rand(1, c.n_global, d, generator=g)) if c.n_global else None
        self.positional_embedding = nn.Parameter(torch.rand(1, c.n_cond, d, generator=g))
        self.alpha_cond = nn.Parameter(torch.rand(1, c.n_cond, d, generator=g))
        with torch.random.fork_rng(devices=[]):  # PyTorch's default init, reproducible from the seed
            torch.manual_seed(c.seed)
            self.linear_C = nn.Linear(2 * c.dino_dim, d)  # per patch: src || trg -> text width
            self.linear_N = nn.Linear(c.n_patches, c.n_patches)  # across patches
        self.adaptive_pool = nn.AdaptiveMaxPool1d(c.n_cond)

    def linear_parameters(self) -> list[nn.Parameter]:
        """The two linear layers (trained at a lower learning rate in the paper)."""
        return [*self.linear_C.parameters(), *self.linear_N.parameters()]

    def param_groups(self, lr: float, lr_linear: float) -> list[dict]:
        """Tokens, positional embedding and gate at ``lr``; the linear layers at ``lr_linear``."""
        linear = {id(p) for p in self.linear_parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in linear], "lr": lr},
                {"params": self.linear_parameters(), "lr": lr_linear}]

    def conditional_rows(self, dino_src: torch.Tensor, dino_trg: torch.Tensor) -> torch.Tensor:
        """The 50 gated conditional rows: (B, P, C) x 2 -> (B, n_cond, D)."""
        x = self.linear_C(torch.cat([dino_src, dino_trg], dim=-1).to(self.linear_C.weight.dtype))  # (B, P, D)
        x = self.linear_N(x.transpose(1, 2))  # (B, D, P): mixes patches
        x = self.adaptive_pool(x).transpose(1, 2)  # (B, n_cond, D)
        return torch.tanh(self.alpha_cond) * (x + self.positional_embedding)

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        batch = batch or {}
        if batch.get("dino_src") is None or batch.get("dino_trg") is None:
            raise Sd4MatchError("a CPM prompt needs the DINOv2 tokens of both images (dino_src, dino_trg)")
        s, t = batch["dino_src"], batch["dino_trg"]
        c = self.config
        if s.shape != t.shape or s.ndim != 3 or s.shape[1:] != (c.n_patches, c.dino_dim):
            raise Sd4MatchError(f"DINOv2 tokens must both be (B, {c.n_patches}, {c.dino_dim}), got {tuple(s.shape)} and {tuple(t.shape)}")
        rows = self.conditional_rows(s, t)
        if self.global_embeds is not None:
            rows = torch.cat([self.global_embeds.expand(rows.shape[0], -1, -1), rows], dim=1)
        return self.bridge.encode_rows(rows)
