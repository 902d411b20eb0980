"""What every featurizer shares: image input, and the exact pixel <-> cell mapping."""

from __future__ import annotations

import itertools
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.pixels import to_rgb

ImagesLike = torch.Tensor | Sequence[Image.Image | np.ndarray]


def images_to_tensor(images: ImagesLike, resolution: int | tuple[int, int], device=None) -> torch.Tensor:
    """Images as a float tensor in [0, 1], squashed to ``resolution`` (aspect not kept).

    Args:
        images: a tensor (B, 3, H, W) in [0, 1], or a list of PIL images (any mode: RGBA on
            white, 16-bit scaled) or uint8 arrays (H, W[, 3 or 4]).
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
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise Sd4MatchError("no images given")
    out = []
    for i, im in enumerate(images):
        im = rgb_image(im, i).resize((size[1], size[0]), Image.Resampling.BILINEAR)  # as torchvision's Resize on PIL: the official code
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out).to(device)


def rgb_image(im, i: int = 0) -> Image.Image:
    """One picture of a list handed to a featurizer, as an RGB PIL image, converted as the
    CLI's pictures are (RGBA on white, 16-bit scaled; for RGB, L, P and CMYK the same as
    ``.convert("RGB")``, the official code's): a PIL image of any mode, or an (H, W),
    (H, W, 3) or (H, W, 4) uint8 array (as imageio, OpenCV after BGR -> RGB, or
    ``np.asarray(pil_image)`` give)."""
    if isinstance(im, np.ndarray):
        if im.dtype != np.uint8 or not (im.ndim == 2 or (im.ndim == 3 and im.shape[2] in (3, 4))):
            raise Sd4MatchError(f"image {i}: an array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got {im.dtype} {tuple(im.shape)}")
        im = Image.fromarray(np.ascontiguousarray(im))
    elif not isinstance(im, Image.Image):
        raise Sd4MatchError(f"images must be a list of PIL images or uint8 arrays, or one (B, 3, H, W) float tensor in [0, 1]; "
                            f"item {i} is a {type(im).__name__}" + (" (stack them: torch.stack(images))" if isinstance(im, torch.Tensor) else ""))
    return to_rgb(im)


class CellMap:
    """Exact mapping between original image pixels and feature cells, one affine map per axis.

    Cell coordinates put the centre of cell i at the integer i (cells run 0 ... w - 1), as
    ``sd4match.matching`` expects. ``cell = pixel * scale - offset``; each featurizer
    documents its own ``scale`` and ``offset``:

    - ``CellMap.centres(image_size, grid_size)`` (the default): the image is squashed onto
      the grid and each cell is the mean of its share of the picture, so the centre of cell
      i lies at pixel (i + 0.5) * W / w in continuous pixels: cell = x * w / W - 0.5.
    - ``CellMap.corners(image_size, grid_size, resolution)`` (Stable Diffusion, the official
      code): pixels go to the R x R working frame (x' = x * R / W), whose corners align with
      the grid's: cell = x' * (w - 1) / (R - 1).
    """

    def __init__(self, image_size: Sequence[float], grid_size: Sequence[int], scale: Sequence[float], offset: Sequence[float] = (0.0, 0.0)):
        self.image_size = (float(image_size[0]), float(image_size[1]))
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self._scale = (float(scale[0]), float(scale[1]))
        self._offset = (float(offset[0]), float(offset[1]))

    @classmethod
    def centres(cls, image_size: Sequence[float], grid_size: Sequence[int]) -> "CellMap":
        W, H = float(image_size[0]), float(image_size[1])
        w, h = int(grid_size[0]), int(grid_size[1])
        return cls((W, H), (w, h), scale=(w / W, h / H), offset=(0.5, 0.5))

    @classmethod
    def corners(cls, image_size: Sequence[float], grid_size: Sequence[int], resolution: int | Sequence[int]) -> "CellMap":
        W, H = float(image_size[0]), float(image_size[1])
        w, h = int(grid_size[0]), int(grid_size[1])
        rw, rh = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
        return cls((W, H), (w, h), scale=(rw / W * (w - 1) / (rw - 1), rh / H * (h - 1) / (rh - 1)))

    def pixel_to_cell(self, xy):
        """(..., 2) pixel coordinates -> cell coordinates (same type as input)."""
        if isinstance(xy, torch.Tensor):
            return xy * torch.as_tensor(self._scale, dtype=xy.dtype, device=xy.device) - torch.as_tensor(self._offset, dtype=xy.dtype, device=xy.device)
        return np.asarray(xy, dtype=np.float64) * np.asarray(self._scale) - np.asarray(self._offset)

    def cell_to_pixel(self, cells):
        """(..., 2) cell coordinates (cell i centred at i) -> pixel coordinates."""
        if isinstance(cells, torch.Tensor):
            return (cells + torch.as_tensor(self._offset, dtype=cells.dtype, device=cells.device)) / torch.as_tensor(self._scale, dtype=cells.dtype, device=cells.device)
        return (np.asarray(cells, dtype=np.float64) + np.asarray(self._offset)) / np.asarray(self._scale)

    def __repr__(self) -> str:
        return f"CellMap(image_size={self.image_size}, grid_size={self.grid_size}, scale={self._scale}, offset={self._offset})"


class Featurizer(torch.nn.Module):
    """Base of the featurizers: call with images, get (B, C, h, w) features.

    Subclasses set ``resolution`` and implement ``grid_size``, ``forward`` and
    ``settings`` (everything that changes the result, for cache keys), and declare what
    they offer; the stages ask these declarations, never ``hasattr``:

    - ``takes_prompt``: a prompt conditions the features (``text_bridge``, ``encode_text``,
      ``prompt_dim``, and ``forward(..., prompt_embeds=...)``);
    - ``has_posterior``: a VAE posterior per picture (``posterior(x)``,
      ``posterior_settings()``, ``forward(None, posteriors=..., generator=...)``), which the
      store keeps; its pictures are squashed to ``resolution`` before the model;
    - ``needs_pixels``: with stored posteriors, ``forward`` also takes ``pixels`` (the
      (B, 3, R, R) pictures in [0, 1]);
    - ``max_batch`` and ``samples_per_picture``: model samples per call, and per picture
      (the noisy copies of an ensemble).
    """

    resolution: int
    model_id: str
    takes_prompt: ClassVar[bool] = False
    has_posterior: ClassVar[bool] = False
    needs_pixels: ClassVar[bool] = False
    #: a UNet adapter (LoRA, fine-tuning: ``sd4match.features.adapters``) can be applied (``use_adapter``)
    adapts: ClassVar[bool] = False

    @property
    def grid_size(self) -> tuple[int, int]:
        """(w, h) of the feature map."""
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where its parameters (or buffers) are; the CPU for a featurizer that has none."""
        held = next(itertools.chain(self.parameters(), self.buffers()), None)
        return held.device if held is not None else torch.device("cpu")

    @property
    def max_batch(self) -> int:
        """Most model samples (pictures x ``samples_per_picture``) per call."""
        return 16

    @property
    def samples_per_picture(self) -> int:
        """Model samples per picture (noisy copies averaged; 1 for deterministic networks)."""
        return 1

    @property
    def text_bridge(self):
        """The ``TextEncoderBridge`` prompts are encoded with (featurizers that ``takes_prompt``)."""
        raise Sd4MatchError(f"{self.model_id} takes no prompt")

    def use_adapter(self, adapter) -> "Featurizer":
        """Apply a UNet adapter from now on (None: none); featurizers without a UNet refuse one."""
        if adapter is not None:
            raise Sd4MatchError(f"{self.model_id}: has no UNet to adapt (LoRA and fine-tuning are for Stable Diffusion models)")
        return self

    def reconfigure(self, **changes) -> "Featurizer":
        """Change settings in place (timestep, up_block, ensemble, ...); returns self."""
        if changes:
            raise Sd4MatchError(f"{self.model_id}: its settings ({', '.join(sorted(changes))}) cannot be changed")
        return self

    def cell_map(self, image_size: Sequence[int]) -> CellMap:
        """The pixel <-> cell mapping for an image of ``image_size`` = (W, H) (default: ``CellMap.centres``)."""
        return CellMap.centres(image_size, self.grid_size)

    def pixel_to_cell(self, xy, image_size: Sequence[int]):
        return self.cell_map(image_size).pixel_to_cell(xy)

    def cell_to_pixel(self, cells, image_size: Sequence[int]):
        return self.cell_map(image_size).cell_to_pixel(cells)
