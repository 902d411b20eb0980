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


def softargmax_cells(corr: torch.Tensor, temperature: float = 0.04, window: torch.Tensor | None = None) -> torch.Tensor:
    """Expected cell centre under softmax(corr / T), optionally times a window.

    Shape:
        corr: (B, N, h, w); window: broadcastable to corr -> (B, N, 2).
    """
    b, n, h, w = corr.shape
    p = torch.softmax(corr.float().reshape(b, n, h * w) / temperature, dim=-1).reshape(b, n, h, w)
    if window is not None:
        p = p * window
        p = p / p.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    xs = torch.arange(w, device=corr.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=corr.device, dtype=torch.float32) + 0.5
    return torch.stack([(p.sum(dim=-2) * xs).sum(-1), (p.sum(dim=-1) * ys).sum(-1)], dim=-1)


def cell_sq_dist(centres: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Squared distance from every cell centre to ``centres`` (in cells).

    Shape:
        centres: (B, N, 2) -> (B, N, h, w).
    """
    xs = torch.arange(w, device=centres.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=centres.device, dtype=torch.float32) + 0.5
    dx = xs.view(1, 1, 1, w) - centres[..., 0, None, None]
    dy = ys.view(1, 1, h, 1) - centres[..., 1, None, None]
    return dx**2 + dy**2


def gaussian_window(centres: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2) between every cell centre and ``centres``: (B, N, 2) -> (B, N, h, w)."""
    return torch.exp(-cell_sq_dist(centres, h, w) / (2 * sigma**2))


def match_cells(
    corr: torch.Tensor,
    rule: str = "kernel-softargmax",
    *,
    temperature: float = 0.04,
    sigma: float = 7.0,
    upsample: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target cell coordinates and a confidence for each source point.

    Rules:
        ``nn``: centre of the best cell.
        ``bilinear``: the correlation upsampled ``upsample`` times with bilinear
            interpolation, then the best sub-cell (1 / upsample cell precision; odd, so
            every cell centre is also a sub-cell centre).
        ``softargmax``: the expectation of cell centres under softmax(corr / T).
        ``kernel-softargmax``: the same, with the probabilities multiplied by a Gaussian
            (``sigma`` cells) around the best cell and renormalised, so a far second peak
            cannot pull the estimate.

    Shape:
        corr: (B, N, h, w) -> cells (B, N, 2) as (x, y), scores (B, N) (the best correlation).
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; expected one of {', '.join(MATCH_RULES)}")
    corr = corr.float()
    best, score = argmax_cells(corr)
    if rule == "nn":
        return best, score
    if rule == "bilinear":
        if upsample < 1 or upsample % 2 == 0:
            raise ValueError(f"upsample must be odd and positive, got {upsample}")
        b, n, h, w = corr.shape
        fine = F.interpolate(corr.reshape(b * n, 1, h, w), scale_factor=upsample, mode="bilinear", align_corners=False)
        fine = fine.reshape(b, n, h * upsample, w * upsample)
        # ties (flat tops, the replicated border) go to the sub-cell nearest the best cell
        top = fine >= fine.amax(dim=(-2, -1), keepdim=True) - 1e-6
        near = cell_sq_dist(best * upsample, h * upsample, w * upsample)
        cells, _ = argmax_cells(torch.where(top, -near, torch.full_like(fine, -float("inf"))))
        return cells / upsample, score
    if rule == "softargmax":
        return softargmax_cells(corr, temperature), score
    h, w = corr.shape[-2:]
    return softargmax_cells(corr, temperature, gaussian_window(best, h, w, sigma)), score


def cell_centres(h: int, w: int, device=None) -> torch.Tensor:
    """All cell centres of an (h, w) grid in row-major order: (h * w, 2) as (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device) + 0.5, torch.arange(w, device=device) + 0.5, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).float()


def match(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_cells: torch.Tensor,
    rule: str = "kernel-softargmax",
    **rule_kwargs,
) -> dict[str, torch.Tensor]:
    """Match source points (in cells) into the target grid.

    Args:
        src_feats, trg_feats: (B, C, hs, ws) and (B, C, ht, wt) feature maps.
        src_cells: (B, N, 2) source points in continuous cells (``CellMap.pixel_to_cell``).
        rule: ``nn``, ``bilinear``, ``softargmax`` or ``kernel-softargmax``.
        rule_kwargs: ``temperature``, ``sigma``, ``upsample`` (see ``match_cells``).

    Returns:
        ``{"cells": (B, N, 2) target cells, "scores": (B, N) best cosine similarity}``.
    """
    _check("src_feats", src_feats, 4)
    _check("trg_feats", trg_feats, 4)
    if src_feats.shape[:2] != trg_feats.shape[:2]:
        raise ValueError(f"feature maps differ in batch or channels: {tuple(src_feats.shape)} vs {tuple(trg_feats.shape)}")
    cells, scores = match_cells(point_correlation(src_feats, trg_feats, src_cells), rule, **rule_kwargs)
    return {"cells": cells, "scores": scores}


def match_pixels(featurizer, src_feats, trg_feats, src_kps, src_size, trg_size, rule: str = "kernel-softargmax", **rule_kwargs) -> dict[str, torch.Tensor]:
    """``match`` for one pair in original pixels, through the featurizer's own cell mapping.

    Shape:
        src_feats, trg_feats: (1, C, h, w) or (C, h, w); src_kps: (N, 2) pixels of the
        source image -> ``{"kps": (N, 2) pixels of the target image, "scores": (N,)}``.
    """
    src_feats = src_feats if src_feats.ndim == 4 else src_feats[None]
    trg_feats = trg_feats if trg_feats.ndim == 4 else trg_feats[None]
    kps = torch.as_tensor(src_kps, dtype=torch.float32, device=src_feats.device).reshape(-1, 2)
    cells = featurizer.cell_map(src_size).pixel_to_cell(kps)[None]
    out = match(src_feats, trg_feats, cells, rule, **rule_kwargs)
    return {"kps": featurizer.cell_map(trg_size).cell_to_pixel(out["cells"][0]), "scores": out["scores"][0]}


def dense_match(src_feats: torch.Tensor, trg_feats: torch.Tensor, rule: str = "nn", *, mutual: bool = False, **rule_kwargs) -> dict[str, torch.Tensor]:
    """For every source cell centre: its target location, a confidence, and (optionally)
    whether it is a mutual nearest neighbour.

    Shape:
        src_feats: (B, C, hs, ws) -> ``{"cells": (B, hs * ws, 2), "scores": (B, hs * ws),
        "mutual": (B, hs * ws) bool}`` in row-major source order. With ``mutual``, the
        scores of non-mutual matches are set to 0.
    """
    b, _, hs, ws = src_feats.shape
    centres = cell_centres(hs, ws, src_feats.device).expand(b, -1, -1)
    corr = point_correlation(src_feats, trg_feats, centres)  # (B, hs*ws, ht, wt)
    cells, scores = match_cells(corr, rule, **rule_kwargs)
    ht, wt = corr.shape[-2:]
    flat = corr.reshape(b, hs * ws, ht * wt)
    fwd = flat.argmax(dim=-1)  # best target cell of each source cell
    bwd = flat.argmax(dim=1)  # best source cell of each target cell
    is_mutual = torch.gather(bwd, 1, fwd) == torch.arange(hs * ws, device=flat.device)
    if mutual:
        scores = torch.where(is_mutual, scores, torch.zeros_like(scores))
    return {"cells": cells, "scores": scores, "mutual": is_mutual}
