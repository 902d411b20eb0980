"""Gaussian-window cross-entropy: the training loss of SD4Match.

For each source keypoint, the cosine correlation with every target cell becomes a
distribution p = softmax(corr / T) over the target grid. The target distribution is a
7 x 7 window of Gaussian weights (sigma = 1.5 cells) around the sub-cell ground truth:
the window is centred on the cell holding the ground truth, each weight is
exp(-d^2 / 2 sigma^2) with d the distance from that cell's centre to the exact ground
truth, cells outside the grid are dropped, and the weights are normalised to sum 1.
The loss is -sum(q log p), averaged over the valid keypoints.
"""

from __future__ import annotations

import torch


def gaussian_window_target(gt_cells: torch.Tensor, h: int, w: int, size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """The target distribution over the (h, w) grid for each ground-truth point.

    Shape:
        gt_cells: (B, N, 2) continuous cells -> (B, N, h, w), each map summing to 1
        (all zeros for a point whose window lies entirely outside the grid).
    """
    if size % 2 == 0:
        raise ValueError(f"window size must be odd, got {size}")
    centre = torch.floor(gt_cells)  # index of the cell holding the ground truth
    xs = torch.arange(w, device=gt_cells.device, dtype=gt_cells.dtype)
    ys = torch.arange(h, device=gt_cells.device, dtype=gt_cells.dtype)
    r = size // 2
    in_x = (xs.view(1, 1, w) - centre[..., 0:1]).abs() <= r
    in_y = (ys.view(1, 1, h) - centre[..., 1:2]).abs() <= r
    dx = xs.view(1, 1, w) + 0.5 - gt_cells[..., 0:1]
    dy = ys.view(1, 1, h) + 0.5 - gt_cells[..., 1:2]
    wx = torch.exp(-(dx**2) / (2 * sigma**2)) * in_x
    wy = torch.exp(-(dy**2) / (2 * sigma**2)) * in_y
    q = wy[..., :, None] * wx[..., None, :]
    return q / q.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)


def gaussian_window_ce(
    corr: torch.Tensor,
    gt_cells: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    temperature: float = 0.04,
    size: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Mean cross-entropy between softmax(corr / T) and the Gaussian window target.

    Args:
        corr: (B, N, h, w) correlation of each source point with the target grid.
        gt_cells: (B, N, 2) ground-truth target points in continuous cells.
        valid: (B, N) bool; padding keypoints and points outside the grid are masked.

    Returns:
        scalar loss (fp32), 0 with a gradient path when no point is valid.
    """
    b, n, h, w = corr.shape
    inside = (gt_cells[..., 0] >= 0) & (gt_cells[..., 0] < w) & (gt_cells[..., 1] >= 0) & (gt_cells[..., 1] < h)
    mask = inside if valid is None else inside & valid.bool()
    logp = torch.log_softmax(corr.float().reshape(b, n, h * w) / temperature, dim=-1)
    q = gaussian_window_target(gt_cells.float(), h, w, size, sigma).reshape(b, n, h * w)
    ce = -(q * logp).sum(-1)
    m = mask.float()
    return (ce * m).sum() / m.sum().clamp_min(1.0)
