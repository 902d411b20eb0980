"""Correlation of feature maps and the rules that turn it into matched points.

Cell coordinates (every featurizer's ``CellMap`` speaks them): the grid (w, h) has its
cell centres at the integers 0 ... w - 1 and 0 ... h - 1, so cell (i, j) *is* the point
(i, j). Descriptors at sub-cell points are interpolated between the four surrounding
centres (``grid_sample`` with ``align_corners=True``, zeros outside). This is the
official SD4Match code's convention (``utils/matching.py``, ``utils/geometry.py``).

The four rules, exactly as the official code computes them (s = cosine of a query
descriptor with every target cell, features normalised as f / (|f| + 1e-6); with
``similarity="dot"`` s is the raw dot product, the official ``ENABLE_L2_NORM = False`` of
its ``dift`` and ``fuseDino`` configs):

- ``nn``: the integer cell of the largest s.
- ``bilinear``: the query clamped into [1e-5, w - 1 - 1e-5]; the ``nn`` matches of its
  four integer corner cells blended with the query's area weights in that unit square.
- ``softargmax``: p = softmax(s / T); the match is sum p * (x, y).
- ``kernel-softargmax``: a Gaussian G (sigma cells) centred on the integer argmax of s
  multiplies the raw cosine; p = softmax(G * s / T); the match is sum p * (x, y).

Everything is batched over pairs and points; the maths runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd4match.config import MATCH_RULES, MatchConfig, MatchRule  # noqa: F401 (the rules' names and settings, re-exported)

NORM_EPS = 1e-6  # the official L2 normalisation: f / (|f| + 1e-6)
#: what s is: the cosine (``ENABLE_L2_NORM = True``, the official default) or the raw dot product
SIMILARITIES = ("cosine", "dot")
BILINEAR_EPS = 1e-5  # the official clamp of bilinear queries into the grid


def _check(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_rule(rule: str) -> None:
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; expected one of {', '.join(MATCH_RULES)}")


def l2_normalize(f: torch.Tensor, dim: int) -> torch.Tensor:
    """f / (|f| + 1e-6) along ``dim`` (the official normalisation; zero vectors stay zero)."""
    return f / (f.norm(dim=dim, keepdim=True) + NORM_EPS)


def cells_to_grid(cells: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Cell coordinates -> ``grid_sample``'s [-1, 1] frame for ``align_corners=True``."""
    sx, sy = 2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)
    return torch.stack([cells[..., 0] * sx - 1, cells[..., 1] * sy - 1], dim=-1)


def sample_descriptors(feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Bilinearly sampled descriptors at (sub-)cell coordinates; zeros outside the grid.

    Shape:
        feats: (B, C, h, w); cells: (B, N, 2) as (x, y) -> (B, N, C).
    """
    _check("feats", feats, 4)
    _check("cells", cells, 3)
    h, w = feats.shape[-2:]
    grid = cells_to_grid(cells.to(feats.dtype), h, w)
    out = F.grid_sample(feats, grid[:, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[..., 0].transpose(1, 2)


def point_correlation(src_feats: torch.Tensor, trg_feats: torch.Tensor, src_cells: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """Similarity of each source point's descriptor with every target cell: the cosine
    (descriptors normalised as f / (|f| + 1e-6)), or the raw dot product (``"dot"``).

    Shape:
        src_feats: (B, C, hs, ws); trg_feats: (B, C, ht, wt); src_cells: (B, N, 2)
        -> (B, N, ht, wt) (in [-1, 1] for the cosine).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {', '.join(SIMILARITIES)}")
    desc = sample_descriptors(src_feats.float(), src_cells.float())
    trg = trg_feats.float()
    if similarity == "cosine":
        desc, trg = l2_normalize(desc, dim=-1), l2_normalize(trg, dim=1)
    return torch.einsum("bnc,bchw->bnhw", desc, trg)


def grid_xy(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer cell positions: xs (w,), ys (h,) as fp32."""
    return torch.arange(w, device=device, dtype=torch.float32), torch.arange(h, device=device, dtype=torch.float32)


def argmax_cells(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer cell of the largest value, and that value.

    Shape:
        corr: (B, N, h, w) -> cells (B, N, 2) as (x, y), scores (B, N).
    """
    b, n, h, w = corr.shape
    score, idx = corr.reshape(b, n, h * w).max(dim=-1)
    cells = torch.stack([(idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()], dim=-1)
    return cells, score


def expected_cells(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum softmax(logits / T) * (x, y) over the integer cell positions.

    Shape:
        logits: (B, N, h, w) -> (B, N, 2).
    """
    b, n, h, w = logits.shape
    p = torch.softmax(logits.float().reshape(b, n, h * w) / temperature, dim=-1).reshape(b, n, h, w)
    xs, ys = grid_xy(h, w, logits.device)
    return torch.stack([(p.sum(dim=-2) * xs).sum(-1), (p.sum(dim=-1) * ys).sum(-1)], dim=-1)


def gaussian_kernel(centres: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """exp(-((x - cx)^2 + (y - cy)^2) / (2 sigma^2)) at every integer cell.

    Shape:
        centres: (B, N, 2) -> (B, N, h, w).
    """
    xs, ys = grid_xy(h, w, centres.device)
    dx = xs.view(1, 1, 1, w) - centres[..., 0, None, None]
    dy = ys.view(1, 1, h, 1) - centres[..., 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def match_cells(corr: torch.Tensor, rule: str = "kernel-softargmax", *, temperature: float = 0.04, sigma: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Target cells from a correlation alone: ``nn``, ``softargmax``, ``kernel-softargmax``.

    (``bilinear`` needs the source features as well: use ``match``.)

    Shape:
        corr: (B, N, h, w) raw cosine -> cells (B, N, 2) as (x, y), scores (B, N) (the best cosine).
    """
    _check_rule(rule)
    if rule == "bilinear":
        raise ValueError("the bilinear rule matches the query's four corner cells: call sd4match.matching.match with the feature maps")
    corr = corr.float()
    best, score = argmax_cells(corr)
    if rule == "nn":
        return best, score
    if rule == "softargmax":
        return expected_cells(corr, temperature), score
    h, w = corr.shape[-2:]
    return expected_cells(gaussian_kernel(best, h, w, sigma) * corr, temperature), score


def bilinear_corners(query: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four integer corners around each query and their area weights (official ``bilinear``).

    The query is first pushed into the grid: coordinates <= 0 become 1e-5, >= size - 1
    become size - 1 - 1e-5. Corner order: (floor x, floor y), (floor x, floor y + 1),
    (floor x + 1, floor y), (floor x + 1, floor y + 1); each weight is the area of the
    rectangle between the query and the opposite corner.

    Shape:
        query: (B, N, 2) -> corners (B, N, 4, 2), weights (B, N, 4) summing to 1.
    """
    q = query.float().clone()
    for d, size in ((0, w), (1, h)):
        c = q[..., d]
        c = torch.where(c <= 0, torch.full_like(c, BILINEAR_EPS), c)
        q[..., d] = torch.where(c >= size - 1, torch.full_like(c, size - 1 - BILINEAR_EPS), c)
    x0, y0 = torch.floor(q[..., 0]), torch.floor(q[..., 1])
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x0, y0 + 1], -1), torch.stack([x0 + 1, y0], -1), torch.stack([x0 + 1, y0 + 1], -1)], dim=-2)
    opposite = corners.flip(-2)  # the corner diagonally across from each corner
    area = (q[..., None, :] - opposite).abs().prod(dim=-1)
    return corners, area / area.sum(dim=-1, keepdim=True)


def match(src_feats: torch.Tensor, trg_feats: torch.Tensor, src_cells: torch.Tensor, rule: str = "kernel-softargmax", *, similarity: str = "cosine",
          **rule_kwargs) -> dict[str, torch.Tensor]:
    """Match source points (in cells) into the target grid.

    Args:
        src_feats, trg_feats: (B, C, hs, ws) and (B, C, ht, wt) feature maps.
        src_cells: (B, N, 2) source points in cell coordinates (``CellMap.pixel_to_cell``).
        rule: ``nn``, ``bilinear``, ``softargmax`` or ``kernel-softargmax``.
        similarity: ``cosine`` (default) or ``dot`` (``SIMILARITIES``).
        rule_kwargs: ``temperature`` (default 0.04), ``sigma`` (default 7 cells).

    Returns:
        ``{"cells": (B, N, 2) target cells, "scores": (B, N) best similarity of the query}``.
    """
    _check("src_feats", src_feats, 4)
    _check("trg_feats", trg_feats, 4)
    _check_rule(rule)
    if src_feats.shape[:2] != trg_feats.shape[:2]:
        raise ValueError(f"feature maps differ in batch or channels: {tuple(src_feats.shape)} vs {tuple(trg_feats.shape)}")
    if rule != "bilinear":
        cells, scores = match_cells(point_correlation(src_feats, trg_feats, src_cells, similarity), rule, **rule_kwargs)
        return {"cells": cells, "scores": scores}
    b, n, _ = src_cells.shape
    hs, ws = src_feats.shape[-2:]
    corners, weights = bilinear_corners(src_cells, hs, ws)
    # one correlation for the queries themselves (their score) and their 4 corners
    pts = torch.cat([src_cells.float(), corners.reshape(b, n * 4, 2)], dim=1)
    best, score = argmax_cells(point_correlation(src_feats, trg_feats, pts, similarity))
    cells = (best[:, n:].reshape(b, n, 4, 2) * weights[..., None]).sum(dim=-2)
    return {"cells": cells, "scores": score[:, :n]}


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


def cell_centres(h: int, w: int, device=None) -> torch.Tensor:
    """All cell positions of an (h, w) grid in row-major order: (h * w, 2) as (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).float()


def dense_match(src_feats: torch.Tensor, trg_feats: torch.Tensor, rule: str = "nn", *, mutual: bool = False, similarity: str = "cosine",
                **rule_kwargs) -> dict[str, torch.Tensor]:
    """For every source cell: its target location, a confidence, and whether it is a mutual
    nearest neighbour.

    Shape:
        src_feats: (B, C, hs, ws) -> ``{"cells": (B, hs * ws, 2), "scores": (B, hs * ws),
        "mutual": (B, hs * ws) bool}`` in row-major source order. With ``mutual``, the
        scores of non-mutual matches are set to 0.
    """
    _check_rule(rule)
    b, _, hs, ws = src_feats.shape
    centres = cell_centres(hs, ws, src_feats.device).expand(b, -1, -1)
    corr = point_correlation(src_feats, trg_feats, centres, similarity)  # (B, hs*ws, ht, wt)
    if rule == "bilinear":  # at integer queries the corner blend is the query's own nn match
        cells = match(src_feats, trg_feats, centres, rule, similarity=similarity)["cells"]
        scores = corr.flatten(2).amax(-1)
    else:
        cells, scores = match_cells(corr, rule, **rule_kwargs)
    ht, wt = corr.shape[-2:]
    flat = corr.reshape(b, hs * ws, ht * wt)
    fwd = flat.argmax(dim=-1)  # best target cell of each source cell
    bwd = flat.argmax(dim=1)  # best source cell of each target cell
    is_mutual = torch.gather(bwd, 1, fwd) == torch.arange(hs * ws, device=flat.device)
    if mutual:
        scores = torch.where(is_mutual, scores, torch.zeros_like(scores))
    return {"cells": cells, "scores": scores, "mutual": is_mutual}


def border_contrast(feats: torch.Tensor, quantile: float = 0.9) -> torch.Tensor:
    """How unlike the picture's border each cell is: a cheap saliency prior (the object of a
    photo rarely fills its border). 1 - the ``quantile`` of a cell's cosine to the border
    cells, scaled to [0, 1] per picture.

    Shape:
        feats: (B, C, h, w) -> (B, h, w).
    """
    _check("feats", feats, 4)
    b, c, h, w = feats.shape
    f = l2_normalize(feats.float(), dim=1).reshape(b, c, h * w)
    ring = torch.zeros(h, w, dtype=torch.bool, device=feats.device)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    sim = torch.einsum("bcn,bcm->bnm", f, f[:, :, ring.reshape(-1)])  # (B, hw, border cells)
    sal = 1 - torch.quantile(sim, quantile, dim=-1)
    lo, hi = sal.amin(dim=-1, keepdim=True), sal.amax(dim=-1, keepdim=True)
    return ((sal - lo) / (hi - lo).clamp_min(1e-9)).reshape(b, h, w)
