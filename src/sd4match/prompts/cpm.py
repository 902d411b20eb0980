"""Conditional Prompting Module (CPM): a prompt built from DINOv2 features of both images.

concat(src, trg) patch tokens (B, 256, 2C) -> Linear(2C -> D) -> Linear over the 256
patches -> adaptive max-pool to 50 -> + positional embedding -> x tanh(gate); the prompt
is 25 global learnable tokens followed by these 50 conditional tokens, one prompt for
both images of a pair. The gate starts at 0, so training starts from the global prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from sd4match.errors import Sd4MatchError
from sd4match.prompts.base import Prompt, PromptConfig, TextEncoderBridge


class ConditionalPrompt(Prompt):
    """CPM.

    Shape:
        batch["dino_src"], batch["dino_trg"]: (B, P, C) patch tokens -> (B, 77, D).
    """

    kind = "cpm"

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
            config = PromptConfig(kind="cpm", text_dim=bridge.dim, n_tokens=n_global + n_cond, n_global=n_global, n_cond=n_cond,
                                  dino_dim=dino_dim, n_patches=n_patches, seed=seed, dino_model=dino_model)
        super().__init__(bridge, config)
        c, d = self.config, bridge.dim
        g = torch.Generator().manual_seed(c.seed)
        self.global_tokens = nn.Parameter(bridge.random_vocab_embeddings((1, c.n_global), g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.proj = nn.Linear(2 * c.dino_dim, d)  # per patch: src || trg -> text width
            self.mix = nn.Linear(c.n_patches, c.n_patches)  # across patches
            self.pos = nn.Parameter(torch.randn(1, c.n_cond, d) * 0.02)
        self.pool = nn.AdaptiveMaxPool1d(c.n_cond)
        self.gate = nn.Parameter(torch.zeros(1))

    def linear_parameters(self) -> list[nn.Parameter]:
        """The two linear layers (trained at a lower learning rate in the paper)."""
        return [*self.proj.parameters(), *self.mix.parameters()]

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        batch = batch or {}
        if batch.get("dino_src") is None or batch.get("dino_trg") is None:
            raise Sd4MatchError("a CPM prompt needs the DINOv2 tokens of both images (dino_src, dino_trg)")
        s, t = batch["dino_src"], batch["dino_trg"]
        c = self.config
        if s.shape != t.shape or s.ndim != 3 or s.shape[1:] != (c.n_patches, c.dino_dim):
            raise Sd4MatchError(f"DINOv2 tokens must both be (B, {c.n_patches}, {c.dino_dim}), got {tuple(s.shape)} and {tuple(t.shape)}")
        x = self.proj(torch.cat([s, t], dim=-1).to(self.proj.weight.dtype))  # (B, P, D)
        x = self.mix(x.transpose(1, 2))  # (B, D, P)
        x = self.pool(x).transpose(1, 2)  # (B, n_cond, D)
        x = (x + self.pos) * torch.tanh(self.gate)
        tokens = torch.cat([self.global_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        return self.bridge.encode_tokens(tokens)
