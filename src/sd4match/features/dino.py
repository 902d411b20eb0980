"""DINOv2 patch features (transformers ``Dinov2Model``), in two modes.

- ``crop`` (the CPM's conditioning input, as the official code): resized (shorter side
  256, bicubic), centre-cropped to 224 x 224, ImageNet-normalised; 16 x 16 patch tokens.
- ``squash`` (DINOv2 as a matching backbone, the field's zero-shot setting): the picture
  squashed to ``resolution`` x ``resolution`` (a multiple of 14; default 840 -> 60 x 60
  patches, bilinear), ImageNet-normalised; patch i is centred at the integer cell i, at
  (i + 0.5) x 14 pixels of the squashed picture (``CellMap.centres``).

The output is the last layer's patch tokens without CLS (and without register tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.features.base import CellMap, Featurizer, ImagesLike, images_to_tensor
from sd4match.features.registry import offline_mode, resolve, weights_missing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        if config.mode == "squash" and config.resolution % self.patch:
            raise Sd4MatchError(f"DINOv2 resolution must be a multiple of {self.patch}, got {config.resolution}")

    @classmethod
    def from_pretrained(cls, model: str | Path = "dinov2-b", *, local_files_only: bool | None = None, resolution: int | None = None,
                        **ignored) -> "DinoFeaturizer":
        """Load DINOv2; ``resolution`` given: the matching backbone (``squash`` mode at that
        side), else the CPM's 224 centre crop."""
        net, model_id = cls.load_model(model, local_files_only=local_files_only)
        cfg = DinoConfig(mode="squash", resolution=resolution) if resolution else DinoConfig()
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
            return Dinov2Model.from_pretrained(res.location, local_files_only=True), res.model_id
        if res.kind != "hub":
            raise Sd4MatchError(f"{model}: DINOv2 loads from a registry name, hub id or transformers folder")
        try:
            net = Dinov2Model.from_pretrained(res.location, revision=res.revision, local_files_only=offline)
        except Exception as e:  # hub and cache errors come in many types; all mean "not here"
            raise weights_missing("DINOv2", res, offline, e) from None
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
            return {"featurizer": "dinov2", "model": self.model_id, "mode": "squash", "resolution": self.config.resolution}
        return {"featurizer": "dinov2", "model": self.model_id, "resize": self.config.resize, "crop": self.config.crop}

    def preprocess(self, images: ImagesLike) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised pictures: 224 centre crops, or squashed to ``resolution``."""
        if self.config.mode == "squash":
            x = images_to_tensor(images, self.config.resolution, device=self.model.device)
            return imagenet_normalize(x).to(self.model.dtype)
        if isinstance(images, torch.Tensor):
            images = [Image.fromarray((im.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)) for im in images]
        out = []
        for im in images:
            im = im.convert("RGB")
            s = self.config.resize / min(im.size)
            w, h = max(self.config.crop, round(im.width * s)), max(self.config.crop, round(im.height * s))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - self.config.crop) // 2, (h - self.config.crop) // 2
            im = im.crop((left, top, left + self.config.crop, top + self.config.crop))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return imagenet_normalize(torch.stack(out)).to(self.model.device, self.model.dtype)

    def tokens(self, images: ImagesLike) -> torch.Tensor:
        """Patch tokens (B, N, C), CLS and register tokens dropped."""
        return self.tokens_of(self.preprocess(images))

    def forward(self, images: ImagesLike, *, prompt_embeds=None, text=None, generator=None) -> torch.Tensor:
        t = self.tokens(images)
        w, h = self.grid_size
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def tokens_of(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, C) fp32 of already preprocessed pixels."""
        with torch.no_grad():
            out = self.model(pixel_values=pixel_values.to(self.model.dtype)).last_hidden_state
        return out[:, self.n_skip :].float()

    def cell_map(self, image_size) -> CellMap:
        """Squash mode: ``CellMap.centres``. Crop mode: pixel -> resize -> crop offset -> patch
        grid, patch i centred at the integer i (its centre is crop pixel (i + 0.5) * 14)."""
        if self.config.mode == "squash":
            return CellMap.centres(image_size, self.grid_size)
        W, H = image_size
        s = self.config.resize / min(W, H)
        w, h = max(self.config.crop, round(W * s)), max(self.config.crop, round(H * s))
        left, top = (w - self.config.crop) // 2, (h - self.config.crop) // 2
        per = self.grid_size[0] / self.config.crop
        return CellMap(image_size, self.grid_size, scale=(w / W * per, h / H * per), offset=(left * per + 0.5, top * per + 0.5))
