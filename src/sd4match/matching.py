"""Correlation of feature maps and the rules that turn it into matched points.

Coordinates are continuous cells (``CellMap``): the grid (w, h) covers [0, w] x [0, h] and
cell (i, j) has its centre at (i + 0.5, j + 0.5). Everything is batched over pairs and
points; the maths runs in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

MatchRule = Literal["nn", "bilinear", "softargmax", "kernel-softargmax"]
MATCH_RULES: tuple[str, ...] = ("nn", "bilinear", "softargmax", "kernel-softargmax")


def _check(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def sample_descriptors(feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Bilinearly sampled descriptors at continuous cell coordinates.

    Shape:
        feats: (B, C, h, w); cells: (B, N, 2) as (x, y) -> (B, N, C).
    """
    _check("feats", feats, 4)
    _check("cells", cells, 3)
    h, w = feats.shape[-2:]
    grid = torch.stack([cells[..., 0] / w * 2 - 1, cells[..., 1] / h * 2 - 1], dim=-1).to(feats.dtype)
    out = F.grid_sample(feats, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def point_correlation(src_feats: torch.Tensor, trg_feats: torch.Tensor, src_cells: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each source point's descriptor with every target cell.

    Shape:
        src_feats: (B, C, hs, ws); trg_feats: (B, C, ht, wt); src_cells: (B, N, 2)
        -> (B, N, ht, wt) in [-1, 1].
    """
    desc = F.normalize(sample_descriptors(src_feats.float(), src_cells.float()), dim=-1)
    trg = F.normalize(trg_feats.float(), dim=1)
    return torch.einsum("bnc,bchw->bnhw", desc, trg)


def argmax_cells(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of the best cell and its score.

    Shape:
        corr: (B, N, h, w) -> cells (B, N, 2), scores (B, N).
    """
    b, n, h, w = corr.shape
    score, idx = corr.reshape(b, n, h * w).max(dim=-1)
    cells = torch.stack([(idx % w).float() + 0.5, torch.div(idx, w, rounding_mode="floor").float() + 0.5], dim=-1)
    return cells, score
