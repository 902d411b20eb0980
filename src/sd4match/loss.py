"""Gaussian-window cross-entropy: the training loss of SD4Match, as the official code computes it.

For each source keypoint, p = softmax(s / T) over the h x w target cells (s the raw
cosine). Around the ground-truth target point g (cell coordinates, cell centres at the
integers), p is sampled bilinearly (``align_corners=True``, border padding) at the
size x size sub-cell positions g + (dx, dy), dx, dy in {-size//2 ... size//2}. Each
position weighs k(r) = exp(-r^2 / (2 sigma^2)) / (2 pi sigma^2), the *unnormalised*
2-D Gaussian pdf (sigma = size / 4 = 1.5 for 7, as in the official code; the 49 weights
sum to about 0.965). Positions outside the open box 0 < x < w - 1, 0 < y < h - 1 are
masked (not renormalised). A pair's loss is -sum k log p~ over its points and
positions, divided by its number of (valid) keypoints; the batch loss is the mean over
pairs (those with at least one valid keypoint).
"""

from __future__ import annotations

import math

import torch


def window_offsets(size: int, device=None) -> torch.Tensor:
    """The (size, size, 2) offsets (dx, dy), row-major in dy then dx."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be odd and positive, got {size}")
    r = torch.arange(-(size // 2), size // 2 + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dx, dy], dim=-1)


def window_weights(size: int, sigma: float, device=None) -> torch.Tensor:
    """The unnormalised Gaussian pdf exp(-r^2 / 2 sigma^2) / (2 pi sigma^2) at the offsets: (size, size)."""
    off = window_offsets(size, device)
    return torch.exp(-(off**2).sum(-1) / (2 * sigma**2)) / (2 * math.pi * sigma**2)


def sample_border(p: torch.Tensor, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear samples of flattened maps at cell positions, border padding: what
    ``grid_sample(bilinear, align_corners=True, padding_mode="border")`` computes, with the
    interpolation weights taken from the cell coordinates directly (exact at integers, where
    the round trip through grid_sample's [-1, 1] frame leaks ~1e-7 of a neighbour).

    Shape:
        p: (B, N, h * w); pos: (B, N, K, 2) -> (B, N, K).
    """
    x = pos[..., 0].clamp(0, w - 1)
    y = pos[..., 1].clamp(0, h - 1)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)

    def at(yy, xx):
        return torch.gather(p, 2, (yy * w + xx).flatten(2)).view_as(fx)

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x1) * fx * (1 - fy) + at(y1, x0) * (1 - fx) * fy + at(y1, x1) * fx * fy)


def gaussian_window_ce(
    corr: torch.Tensor,
    gt_cells: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    temperature: float = 0.04,
    size: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """The official Gaussian-window cross-entropy.

    Args:
        corr: (B, N, h, w) raw cosine of each source keypoint with the target grid.
        gt_cells: (B, N, 2) ground-truth target points in the featurizer's cell coordinates.
        valid: (B, N) bool; False marks padding keypoints (not counted).
        temperature: softmax temperature T.
        size, sigma: the window (size x size positions) and its Gaussian (cells).

    Returns:
        scalar fp32: the mean over pairs of (pair sum / pair's valid keypoints); 0 with a
        gradient path when no pair has a valid keypoint.
    """
    b, n, h, w = corr.shape
    dev = corr.device
    p = torch.softmax(corr.float().reshape(b, n, h * w) / temperature, dim=-1)
    pos = gt_cells.float()[:, :, None, None, :] + window_offsets(size, dev)  # (B, N, S, S, 2)
    inside = (pos[..., 0] > 0) & (pos[..., 0] < w - 1) & (pos[..., 1] > 0) & (pos[..., 1] < h - 1)
    sampled = sample_border(p, pos.reshape(b, n, size * size, 2), h, w).reshape(b, n, size, size)
    logp = torch.log(sampled.clamp_min(1e-38))
    k = window_weights(size, sigma, dev)
    per_point = -(torch.where(inside, k * logp, torch.zeros_like(logp))).sum(dim=(-2, -1))  # (B, N)
    m = torch.ones(b, n, device=dev) if valid is None else valid.float()
    count = m.sum(dim=1)
    has = (count > 0).float()
    per_pair = (per_point * m).sum(dim=1) / count.clamp_min(1.0)
    # the mean over the pairs that have a keypoint (0 when none has), computed without reading a
    # value back from the device: a training step need not wait for the GPU here
    return (per_pair * has).sum() / has.sum().clamp_min(1.0)
