"""Conditional Prompting Module (CPM), as the official code's ``HybridCaptioner`` builds it.

The paper's CPM (``cpm``, Pair-DINO-Feat G25-C50): concat(src, trg) DINOv2 patch tokens
(B, 256, 2C) -> ``linear_C`` (2C -> D) -> ``linear_N`` (256 -> 256, across patches) ->
adaptive max-pool over patches to 50 -> + ``positional_embedding`` (1, 50, D) ->
x tanh(``alpha_cond``), an element-wise gate (1, 50, D). The prompt sequence is [BOS row,
25 ``global_embeds``, the 50 conditional rows, EOS row at position 76]: the learned and
conditional rows get no CLIP position embedding. ``global_embeds``,
``positional_embedding`` and ``alpha_cond`` start as U[0, 1) draws; the linear layers have
PyTorch's default initialisation. One prompt for both images of a pair. Parameter names
equal the official state dict's keys.

The official variants are settings of the same modules:

- lengths: ``n_global`` (0 = the official G0: no ``global_embeds``), ``n_cond``;
- ``cpm_input``: ``patches`` (the official ``Feat``), ``cls`` (the official ``Head``: DINOv2's
  pooled CLS token, one (B, C) vector a picture, through one ``linear`` layer, broadcast over
  the conditional rows by the positional embedding; no pooling), or ``mean`` (the mean of
  the patch tokens in its place: a global descriptor of the same tokens);
- ``plain``: the conditional rows are the projection of the DINOv2 tokens alone, with no
  learned global rows, positional embedding or gate (direct image conditioning without
  learned prompt rows: only the linear layers learn);
- the mode: ``cpm`` conditions on both pictures of a pair (the official ``Pair``);
  ``cpm-image`` (``ImageConditionalPrompt``, the official ``Img``) on each picture's own
  tokens, so each picture has its own prompt and its features are made once per picture.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sd4match.errors import Sd4MatchError
from sd4match.features.text import TextEncoderBridge
from sd4match.prompts.base import Prompt, PromptConfig, register

#: what the conditional rows are made from (``cpm_input``)
CPM_INPUTS = ("patches", "cls", "mean")


class _Conditional(Prompt):
    """What the CPM modes share: the learned rows, the gate, the linear layers, the sequence."""

    learned = True
    needs_dino = True
    #: how many pictures' tokens are concatenated along channels (2: a pair, 1: one picture)
    pictures: ClassVar[int] = 2

    def __init__(self, bridge: TextEncoderBridge, *, dino_dim: int = 768, n_patches: int = 256, n_global: int = 25, n_cond: int = 50,
                 cpm_input: str = "patches", plain: bool = False, seed: int = 0, dino_model: str | None = None, config: PromptConfig | None = None):
        if config is None:
            n_global = 0 if plain else n_global
            config = PromptConfig(kind=self.kind, text_dim=bridge.dim, n_tokens=n_global + n_cond, n_global=n_global, n_cond=n_cond,
                                  dino_dim=dino_dim, n_patches=n_patches, seed=seed, dino_model=dino_model, cpm_input=cpm_input,
                                  cpm_plain=True if plain else None)
        super().__init__(bridge, config)
        c, d = self.config, bridge.dim
        if self.cpm_input not in CPM_INPUTS:
            raise Sd4MatchError(f"cpm_input must be one of {', '.join(CPM_INPUTS)}, got {self.cpm_input!r}")
        if c.n_cond < 1 or c.n_global < 0:
            raise Sd4MatchError(f"a CPM needs at least 1 conditional row and no negative global count, got {c.n_global} + {c.n_cond}")
        if c.n_global + c.n_cond > bridge.length - 2:
            raise Sd4MatchError(f"n_global + n_cond must be at most {bridge.length - 2}, got {c.n_global + c.n_cond}")
        if self.plain and c.n_global:
            raise Sd4MatchError("a plain CPM has no global rows (n_global 0)")
        g = torch.Generator().manual_seed(c.seed)
        self.global_embeds = nn.Parameter(torch.rand(1, c.n_global, d, generator=g)) if c.n_global else None
        self.positional_embedding = None if self.plain else nn.Parameter(torch.rand(1, c.n_cond, d, generator=g))
        self.alpha_cond = None if self.plain else nn.Parameter(torch.rand(1, c.n_cond, d, generator=g))
        width = self.pictures * c.dino_dim
        with torch.random.fork_rng(devices=[]):  # PyTorch's default init, reproducible from the seed
            torch.manual_seed(c.seed)
            if self.cpm_input != "patches":
                self.linear = nn.Linear(width, d)  # the official Head: one vector a picture -> text width
            elif self.pictures == 2:
                self.linear_C = nn.Linear(width, d)  # per patch: src || trg -> text width
                self.linear_N = nn.Linear(c.n_patches, c.n_patches)  # across patches
            else:
                self.linear = nn.Linear(width, d)  # the official Img-Feat: per patch -> text width, no patch mixing
        if self.cpm_input == "patches":
            self.adaptive_pool = nn.AdaptiveMaxPool1d(c.n_cond)

    @property
    def cpm_input(self) -> str:
        return self.config.cpm_input or "patches"

    @property
    def plain(self) -> bool:
        return bool(self.config.cpm_plain)

    @property
    def dino_part(self) -> str:
        return "cls" if self.cpm_input == "cls" else "patches"

    def linear_parameters(self) -> list[nn.Parameter]:
        """The linear layers (trained at a lower learning rate in the paper)."""
        return [p for name, p in self.named_parameters() if name.startswith("linear")]

    def param_groups(self, lr: float, lr_linear: float) -> list[dict]:
        """Tokens, positional embedding and gate at ``lr``; the linear layers at ``lr_linear``."""
        linear = {id(p) for p in self.linear_parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in linear], "lr": lr},
                {"params": self.linear_parameters(), "lr": lr_linear}]

    def _check_tokens(self, *ts: torch.Tensor) -> None:
        c = self.config
        want = (1, c.dino_dim) if self.dino_part == "cls" else (c.n_patches, c.dino_dim)
        for t in ts:
            if t.ndim != 3 or tuple(t.shape[1:]) != want or t.shape[0] != ts[0].shape[0]:
                raise Sd4MatchError(f"DINOv2 tokens must be (B, {want[0]}, {want[1]}) for this CPM, got {', '.join(str(tuple(x.shape)) for x in ts)}")

    def conditional_rows(self, *tokens: torch.Tensor) -> torch.Tensor:
        """The gated conditional rows from the pictures' tokens, concatenated along channels:
        (B, P, C) each (``cls``: (B, 1, C)) -> (B, n_cond, D)."""
        x = torch.cat(tokens, dim=-1)
        if self.cpm_input == "mean":
            x = x.mean(dim=1, keepdim=True)
        if self.cpm_input != "patches":
            x = self.linear(x.to(self.linear.weight.dtype))  # (B, 1, D): broadcast over the rows below
        else:
            lin = self.linear_C if self.pictures == 2 else self.linear
            x = lin(x.to(lin.weight.dtype))  # (B, P, D)
            x = x.transpose(1, 2)  # (B, D, P)
            if self.pictures == 2:
                x = self.linear_N(x)  # mixes patches
            x = self.adaptive_pool(x).transpose(1, 2)  # (B, n_cond, D)
        if self.plain:  # the projection alone (Head inputs: the one vector on every row)
            return x.expand(-1, self.config.n_cond, -1)
        return torch.tanh(self.alpha_cond) * (x + self.positional_embedding)

    def sequence(self, rows: torch.Tensor) -> torch.Tensor:
        """[BOS, global rows, conditional rows, EOS] through CLIP: (B, n_cond, D) -> (B, 77, D)."""
        if self.global_embeds is not None:
            rows = torch.cat([self.global_embeds.expand(rows.shape[0], -1, -1), rows], dim=1)
        return self.bridge.encode_rows(rows)


@register
class ConditionalPrompt(_Conditional):
    """CPM conditioned on both pictures of a pair (the paper's; the official ``Pair`` mode).

    Shape:
        batch["dino_src"], batch["dino_trg"]: (B, P, C) patch tokens (``cls``: (B, 1, C))
        -> (B, 77, D).
    """

    kind = "cpm"
    per_pair = True  # built from both images: one prompt per pair

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        batch = batch or {}
        if batch.get("dino_src") is None or batch.get("dino_trg") is None:
            raise Sd4MatchError("a CPM prompt needs the DINOv2 tokens of both images (dino_src, dino_trg)")
        s, t = batch["dino_src"], batch["dino_trg"]
        self._check_tokens(s, t)
        return self.sequence(self.conditional_rows(s, t))


@register
class ImageConditionalPrompt(_Conditional):
    """CPM conditioned on each picture's own tokens (the official ``Img`` mode): every
    picture gets its own prompt, so its features are made once per picture.

    Shape:
        batch["dino"]: (B, P, C) (``cls``: (B, 1, C)) -> (B, 77, D); or a pair batch
        (``dino_src``, ``dino_trg``) -> (2B, 77, D), the sources' prompts then the targets'.
    """

    kind = "cpm-image"
    pictures = 1
    per_picture_condition = True

    def forward(self, batch: dict | None = None) -> torch.Tensor:
        batch = batch or {}
        if batch.get("dino") is not None:
            tokens = batch["dino"]
        elif batch.get("dino_src") is not None and batch.get("dino_trg") is not None:
            tokens = torch.cat([batch["dino_src"], batch["dino_trg"]])
        else:
            raise Sd4MatchError("an image-conditioned CPM prompt needs each picture's DINOv2 tokens (dino, or dino_src and dino_trg)")
        self._check_tokens(tokens)
        return self.sequence(self.conditional_rows(tokens))
