"""What every featurizer shares: image input, and the exact pixel <-> cell mapping."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sd4match.errors import Sd4MatchError

ImagesLike = torch.Tensor | Sequence[Image.Image]


def images_to_tensor(images: ImagesLike, resolution: int | tuple[int, int], device=None) -> torch.Tensor:
    """Images as a float tensor in [0, 1], squashed to ``resolution`` (aspect not kept).

    Args:
        images: a tensor (B, 3, H, W) in [0, 1], or a list of PIL images.
        resolution: side of the square output, or (H, W).

    Shape:
        returns (B, 3, R, R), float32.
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim != 4 or x.shape[1] != 3:
            raise Sd4MatchError(f"images must be a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise Sd4MatchError(f"images must be a float tensor in [0, 1], got dtype {x.dtype}")
        x = x.to(device=device, dtype=torch.float32)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(0, 1)
    if len(images) == 0:
        raise Sd4MatchError("no images given")
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise Sd4MatchError(f"images must be PIL images or a tensor, got {type(im).__name__}")
        im = im.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out).to(device)


class CellMap:
    """Exact mapping between original image pixels and feature cells.

    By default the image is squashed onto the grid: an image of size (W, H) covers
    [0, W] x [0, H] in continuous pixels, the grid (w, h) covers [0, w] x [0, h] in
    continuous cells, cell (i, j) has its centre at (i + 0.5, j + 0.5), and each axis
    scales on its own: x_cell = x * w / W. A featurizer that crops passes its own
    ``scale`` and ``offset``: cell = pixel * scale - offset.
    """

    def __init__(self, image_size: Sequence[int], grid_size: Sequence[int], scale: Sequence[float] | None = None, offset: Sequence[float] = (0.0, 0.0)):
        self.image_size = (float(image_size[0]), float(image_size[1]))
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self._scale = tuple(scale) if scale is not None else (self.grid_size[0] / self.image_size[0], self.grid_size[1] / self.image_size[1])
        self._offset = tuple(offset)

    def pixel_to_cell(self, xy):
        """(..., 2) pixel coordinates -> continuous cell coordinates (same type as input)."""
        if isinstance(xy, torch.Tensor):
            return xy * torch.as_tensor(self._scale, dtype=xy.dtype, device=xy.device) - torch.as_tensor(self._offset, dtype=xy.dtype, device=xy.device)
        return np.asarray(xy, dtype=np.float64) * np.asarray(self._scale) - np.asarray(self._offset)

    def cell_to_pixel(self, cells):
        """(..., 2) continuous cell coordinates -> pixel coordinates (cell centres are at i + 0.5)."""
        if isinstance(cells, torch.Tensor):
            return (cells + torch.as_tensor(self._offset, dtype=cells.dtype, device=cells.device)) / torch.as_tensor(self._scale, dtype=cells.dtype, device=cells.device)
        return (np.asarray(cells, dtype=np.float64) + np.asarray(self._offset)) / np.asarray(self._scale)

    def __repr__(self) -> str:
        return f"CellMap(image_size={self.image_size}, grid_size={self.grid_size}, scale={self._scale}, offset={self._offset})"


class Featurizer(torch.nn.Module):
    """Base of the featurizers: call with images, get (B, C, h, w) features.

    Subclasses set ``resolution`` and implement ``grid_size``, ``forward`` and
    ``settings`` (everything that changes the result, for cache keys).
    """

    resolution: int
    model_id: str

    @property
    def grid_size(self) -> tuple[int, int]:
        """(w, h) of the feature map."""
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def cell_map(self, image_size: Sequence[int]) -> CellMap:
        """The pixel <-> cell mapping for an image of ``image_size`` = (W, H)."""
        return CellMap(image_size, self.grid_size)

    def pixel_to_cell(self, xy, image_size: Sequence[int]):
        return self.cell_map(image_size).pixel_to_cell(xy)

    def cell_to_pixel(self, cells, image_size: Sequence[int]):
        return self.cell_map(image_size).cell_to_pixel(cells)
