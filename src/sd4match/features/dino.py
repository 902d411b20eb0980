"""DINOv2 patch features (transformers ``Dinov2Model``), in two modes.

- ``crop`` (the CPM's conditioning input, as the official code): resized (shorter side
  256, the longer side truncated to an integer as transformers' image processor does,
  bicubic), centre-cropped to 224 x 224, ImageNet-normalised; 16 x 16 patch tokens.
- ``squash`` (DINOv2 as a matching backbone, the field's zero-shot setting): the picture
  squashed to ``resolution`` x ``resolution`` (a multiple of 14; default 840 -> 60 x 60
  patches, bilinear), ImageNet-normalised; patch i is centred at the integer cell i, at
  (i + 0.5) x 14 pixels of the squashed picture (``CellMap.centres``).

The output is the last layer's patch tokens without CLS (and without register tokens).

Position embeddings (``pos``): DINOv2 learned a 37 x 37 grid; at another patch grid
h0 x w0 it is resized bicubically. ``official`` resizes it as the DINOv2 authors' code and
transformers up to 4.3x did, the environment the released SD4Match CPM prompts were
trained in: ``interpolate(grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37))``.
``transformers`` keeps what the installed transformers computes (5.x: ``size=(h0, w0)``;
tokens differ by about 0.1 at 224 px). ``official`` is applied through the model's own
forward: a hook on its embedding layer, present only during the call, swaps the one
interpolation for the other.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.features.base import CellMap, Featurizer, ImagesLike, images_to_tensor, rgb_image
from sd4match.features.registry import load_from_hub, offline_mode, quiet_loading, resolve

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: how the learned position grid is resized to another patch grid (see the module's doc)
DINO_POS = ("official", "transformers")
#: which tokens ``DinoFeaturizer.tokens`` gives: the patch tokens, or the (pooled) CLS token
DINO_PARTS = ("patches", "cls")


def check_dino_pos(pos: str) -> str:
    """``pos`` when it names a position-embedding interpolation (``DINO_POS``), else one line."""
    if pos not in DINO_POS:
        raise Sd4MatchError(f"DINOv2 position embeddings must be one of {', '.join(DINO_POS)}, got {pos!r}")
    return pos


def legacy_position_embeddings(pos: torch.Tensor, grid: tuple[int, int], square: bool) -> torch.Tensor:
    """DINOv2's position embeddings at a patch grid, as the DINOv2 authors and transformers
    4.35 compute them.

    Shape:
        pos: (1, 1 + N, C), CLS first then a sqrt(N) x sqrt(N) grid; grid: (h0, w0)
        -> (1, 1 + h0 * w0, C). Unchanged when h0 * w0 = N and the input is ``square``.
    """
    n = pos.shape[1] - 1
    h0, w0 = grid
    if h0 * w0 == n and square:
        return pos
    side = math.sqrt(n)
    patch = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), scale_factor=(float((h0 + 0.1) / side), float((w0 + 0.1) / side)), mode="bicubic", align_corners=False)
    if patch.shape[-2:] != (h0, w0):
        raise Sd4MatchError(f"DINOv2 position grid of {n} cannot be resized to {h0} x {w0}")
    return torch.cat([pos[:, :1], patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


@contextmanager
def _official_positions(model):
    """While open, ``model``'s embedding layer adds ``legacy_position_embeddings`` instead
    of what the installed transformers computes; the hook is removed on exit."""
    emb = model.embeddings
    patch = int(model.config.patch_size)
    n_reg = int(getattr(model.config, "num_register_tokens", 0) or 0)

    def hook(module, args, output):
        height, width = args[0].shape[-2:]
        grid = (height // patch, width // patch)
        n = 1 + grid[0] * grid[1]
        with torch.no_grad():
            theirs = module.interpolate_pos_encoding(output[:1, :n], height, width)
            ours = legacy_position_embeddings(module.position_embeddings, grid, height == width)
        delta = (ours.float() - theirs.float()).to(output.dtype)
        if not delta.any():
            return output
        out = output.clone()
        out[:, :1] += delta[:, :1]
        out[:, 1 + n_reg :] += delta[:, 1:]  # register tokens (if any) sit between CLS and the patches
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def dino_hidden_states(model, pixel_values: torch.Tensor, pos: str = "official") -> torch.Tensor:
    """``model(pixel_values).last_hidden_state`` (no gradient) with the position embeddings
    ``pos`` names (``DINO_POS``)."""
    with torch.no_grad():
        if check_dino_pos(pos) == "transformers":
            return model(pixel_values=pixel_values).last_hidden_state
        with _official_positions(model):
            return model(pixel_values=pixel_values).last_hidden_state


def _check_part(part: str) -> None:
    if part not in DINO_PARTS:
        raise Sd4MatchError(f"DINOv2 token part must be one of {', '.join(DINO_PARTS)}, got {part!r}")


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(W, H) after transformers' image-processor resize to a shorter side of ``shorter``:
    the longer side is ``int(shorter * long / short)`` (truncated, not rounded)."""
    W, H = int(size[0]), int(size[1])
    if W <= H:
        return shorter, int(shorter * H / W)
    return int(shorter * W / H), shorter


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class DinoConfig:
    mode: str = "crop"  # crop (CPM input) | squash (matching backbone)
    resize: int = 256  # crop: shorter side before the crop
    crop: int = 224  # crop: centre crop side
    resolution: int = 840  # squash: side of the squashed picture (a multiple of the patch size)
    pos: str = "official"  # position embeddings: official (DINOv2 authors, transformers 4.35) | transformers


class DinoFeaturizer(Featurizer):
    """DINOv2 patch tokens behind the featurizer interface.

    Shape:
        ``forward`` returns (B, C, 16, 16) for DINOv2 /14 at 224; ``tokens`` the same as
        (B, 256, C) in row-major patch order.
    """

    def __init__(self, model, config: DinoConfig = DinoConfig(), model_id: str = "unknown"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.model_id = model_id
        self.patch = int(model.config.patch_size)
        self.n_skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        if config.mode not in ("crop", "squash"):
            raise Sd4MatchError(f"DINOv2 mode must be crop or squash, got {config.mode!r}")
        check_dino_pos(config.pos)
        if config.mode == "squash" and config.resolution % self.patch:
            raise Sd4MatchError(f"DINOv2 resolution must be a multiple of {self.patch}, got {config.resolution}")

    @classmethod
    def from_pretrained(cls, model: str | Path = "dinov2-b", *, local_files_only: bool | None = None, resolution: int | None = None,
                        pos: str = "official", **ignored) -> "DinoFeaturizer":
        """Load DINOv2; ``resolution`` given: the matching backbone (``squash`` mode at that
        side), else the CPM's 224 centre crop. ``pos``: position embeddings (``DINO_POS``)."""
        net, model_id = cls.load_model(model, local_files_only=local_files_only)
        cfg = DinoConfig(mode="squash", resolution=resolution, pos=pos) if resolution else DinoConfig(pos=pos)
        return cls(net, cfg, model_id=model_id)

    @staticmethod
    def load_model(model: str | Path = "dinov2-b", *, local_files_only: bool | None = None):
        """(transformers ``Dinov2Model``, model id) from a registry name, hub id or folder."""
        from transformers import Dinov2Model

        res = resolve(model)
        offline = offline_mode(local_files_only)
        if res.kind == "folder":
            if not (Path(res.location) / "config.json").is_file():
                raise Sd4MatchError(f"{res.location}: not a transformers model folder (config.json is missing)")
            with quiet_loading():
                return Dinov2Model.from_pretrained(res.location, local_files_only=True), res.model_id
        if res.kind != "hub":
            raise Sd4MatchError(f"{model}: DINOv2 loads from a registry name, hub id or transformers folder")
        with quiet_loading():
            net = load_from_hub(lambda local: Dinov2Model.from_pretrained(res.location, revision=res.revision, local_files_only=local), "DINOv2", res,
                                offline)
        return net, res.model_id

    @property
    def resolution(self) -> int:  # type: ignore[override]
        return self.config.crop if self.config.mode == "crop" else self.config.resolution

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.resolution // self.patch
        return side, side

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def settings(self) -> dict:
        if self.config.mode == "squash":
            return {"featurizer": "dinov2", "model": self.model_id, "mode": "squash", "resolution": self.config.resolution, "pos": self.config.pos}
        return {"featurizer": "dinov2", "model": self.model_id, "resize": self.config.resize, "resize_rounding": "int", "crop": self.config.crop,
                "pos": self.config.pos}

    def preprocess(self, images: ImagesLike) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised pictures: 224 centre crops, or squashed to ``resolution``."""
        if self.config.mode == "squash":
            x = images_to_tensor(images, self.config.resolution, device=self.model.device)
            return imagenet_normalize(x).to(self.model.dtype)
        if isinstance(images, torch.Tensor):
            images = [Image.fromarray((im.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)) for im in images]
        elif isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        return torch.stack([self.pixels(rgb_image(im, i)) for i, im in enumerate(images)]).to(self.model.device, self.model.dtype)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One PIL picture as the model takes it, (3, S, S) fp32 on the CPU, ImageNet-normalised:
        its 224 centre crop (crop mode), or squashed to ``resolution``. The PIL work of
        ``preprocess``, one picture at a time, so that loader threads can do it ahead
        (``tokens_of_pixels`` then runs the model)."""
        if self.config.mode == "squash":
            return imagenet_normalize(images_to_tensor([image], self.config.resolution))[0]
        im = rgb_image(image)
        w, h = self._resized(im.size)
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - self.config.crop) // 2, (h - self.config.crop) // 2
        im = im.crop((left, top, left + self.config.crop, top + self.config.crop))
        return imagenet_normalize(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None])[0]

    def tokens_of_pixels(self, pixels: torch.Tensor, part: str = "patches") -> torch.Tensor:
        """``tokens`` of pictures already made into model input (``pixels``, stacked: (B, 3, S, S))."""
        _check_part(part)
        x = pixels.to(self.model.device, self.model.dtype)
        if part == "cls":
            return dino_hidden_states(self.model, x, self.config.pos)[:, :1].float()
        return self.tokens_of(x)

    def _resized(self, size) -> tuple[int, int]:
        w, h = resized_size(size, self.config.resize)
        return max(self.config.crop, w), max(self.config.crop, h)

    def tokens(self, images: ImagesLike, part: str = "patches") -> torch.Tensor:
        """Patch tokens (B, N, C), CLS and register tokens dropped; or with ``part="cls"``
        the CLS token after the final LayerNorm (B, 1, C): transformers' ``pooler_output``,
        the official CPM's ``Head`` input."""
        _check_part(part)  # before the pictures are prepared
        return self.tokens_of_pixels(self.preprocess(images), part)

    def forward(self, images: ImagesLike, *, prompt_embeds=None, text=None, generator=None) -> torch.Tensor:
        t = self.tokens(images)
        w, h = self.grid_size
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def tokens_of(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, C) fp32 of already preprocessed pixels."""
        out = dino_hidden_states(self.model, pixel_values.to(self.model.dtype), self.config.pos)
        return out[:, self.n_skip :].float()

    def cell_map(self, image_size) -> CellMap:
        """Squash mode: ``CellMap.centres``. Crop mode: pixel -> resize -> crop offset -> patch
        grid, patch i centred at the integer i (its centre is crop pixel (i + 0.5) * 14)."""
        if self.config.mode == "squash":
            return CellMap.centres(image_size, self.grid_size)
        W, H = image_size
        w, h = self._resized((W, H))
        left, top = (w - self.config.crop) // 2, (h - self.config.crop) // 2
        per = self.grid_size[0] / self.config.crop
        return CellMap(image_size, self.grid_size, scale=(w / W * per, h / H * per), offset=(left * per + 0.5, top * per + 0.5))
