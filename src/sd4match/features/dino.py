"""DINOv2 patch features (transformers ``Dinov2Model``): the CPM's conditioning input.

Images are resized (shorter side 256, bicubic), centre-cropped to 224 x 224 and
normalised with the ImageNet mean and std; the output is the last layer's patch tokens
without CLS (and without register tokens), as a (B, C, 16, 16) map for a 14-pixel patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.features.base import CellMap, Featurizer, ImagesLike
from sd4match.features.registry import offline_mode, resolve, weights_missing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoConfig:
    resize: int = 256  # shorter side before the crop
    crop: int = 224  # centre crop side


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

    @classmethod
    def from_pretrained(cls, model: str | Path = "dinov2-b", *, local_files_only: bool | None = None, **ignored) -> "DinoFeaturizer":
        from transformers import Dinov2Model

        res = resolve(model)
        offline = offline_mode(local_files_only)
        if res.kind == "folder":
            if not (Path(res.location) / "config.json").is_file():
                raise Sd4MatchError(f"{res.location}: not a transformers model folder (config.json is missing)")
            return cls(Dinov2Model.from_pretrained(res.location, local_files_only=True), model_id=res.model_id)
        if res.kind != "hub":
            raise Sd4MatchError(f"{model}: DINOv2 loads from a registry name, hub id or transformers folder")
        try:
            net = Dinov2Model.from_pretrained(res.location, revision=res.revision, local_files_only=offline)
        except Exception as e:  # hub and cache errors come in many types; all mean "not here"
            raise weights_missing("DINOv2", res, offline, e) from None
        return cls(net, model_id=res.model_id)

    @property
    def resolution(self) -> int:  # type: ignore[override]
        return self.config.crop

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.config.crop // self.patch
        return side, side

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def settings(self) -> dict:
        return {"featurizer": "dinov2", "model": self.model_id, "resize": self.config.resize, "crop": self.config.crop}

    def preprocess(self, images: ImagesLike) -> torch.Tensor:
        """(B, 3, 224, 224) normalised crops."""
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
        x = torch.stack(out)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.model.device, self.model.dtype)

    def tokens(self, images: ImagesLike) -> torch.Tensor:
        """Patch tokens (B, N, C), CLS and register tokens dropped."""
        with torch.no_grad():
            out = self.model(pixel_values=self.preprocess(images)).last_hidden_state
        return out[:, self.n_skip :].float()

    def forward(self, images: ImagesLike, *, prompt_embeds=None, text=None, generator=None) -> torch.Tensor:
        t = self.tokens(images)
        w, h = self.grid_size
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def cell_map(self, image_size) -> CellMap:
        """Cells of the centre crop: pixel -> resize -> crop offset -> patch grid, patch i
        centred at the integer i (its centre is crop pixel (i + 0.5) * 14)."""
        W, H = image_size
        s = self.config.resize / min(W, H)
        w, h = max(self.config.crop, round(W * s)), max(self.config.crop, round(H * s))
        left, top = (w - self.config.crop) // 2, (h - self.config.crop) // 2
        per = self.grid_size[0] / self.config.crop
        return CellMap(image_size, self.grid_size, scale=(w / W * per, h / H * per), offset=(left * per + 0.5, top * per + 0.5))
