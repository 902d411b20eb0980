"""Stable Diffusion + DINOv2 feature fusion, as the official SD4Match code's ``FUSE_DINO``.

For each picture: the SD feature map (h x w, e.g. 48 x 48 at 768) and the DINOv2 patch
tokens of the same picture resized to (14 h) x (14 w) (672 x 672; no crop), each
L2-normalised over channels, concatenated as [0.5 x SD, 0.5 x DINOv2] (C_sd + C_dino
channels on the SD grid). The official code hands DINOv2 the picture as SD sees it: squashed
to R x R and scaled to [-1, 1], resized bilinearly without antialiasing (torchvision 0.14's
tensor resize); that is ``dino_input="official"``. ``"imagenet"`` normalises with the
ImageNet mean and std instead, as DINOv2 was trained. ``dino_pos`` chooses the DINOv2
position-embedding interpolation (``sd4match.features.dino``; default ``official``, the
authors' environment).

Any prompt works: it conditions the SD half only. The DINOv2 half is frozen (no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd4match.errors import Sd4MatchError
from sd4match.features.base import CellMap, Featurizer
from sd4match.features.dino import check_dino_pos, dino_hidden_states, imagenet_normalize
from sd4match.features.sd import SDFace
from sd4match.matching import l2_normalize

DINO_INPUTS = ("official", "imagenet")


class FusedFeaturizer(SDFace, Featurizer):
    """SD features fused with DINOv2 patch tokens.

    Behaves as its ``SDFeaturizer`` (prompts, text encoder, posteriors, cell mapping, grid)
    with ``feature_dim`` = C_sd + C_dino.

    Shape:
        ``forward`` returns (B, C_sd + C_dino, h, w) fp32.
    """

    takes_prompt = True
    has_posterior = True
    needs_pixels = True  # the batcher hands the R x R pixels along with stored posteriors

    def __init__(self, sd, dino_model, *, dino_input: str = "official", dino_id: str = "dinov2", dino_pos: str = "official"):
        super().__init__()
        if dino_input not in DINO_INPUTS:
            raise Sd4MatchError(f"dino_input must be one of {', '.join(DINO_INPUTS)}, got {dino_input!r}")
        self.dino_pos = check_dino_pos(dino_pos)
        self.sd = sd
        self.dino = dino_model.eval().requires_grad_(False)
        self.dino_input = dino_input
        self.dino_id = dino_id
        self.patch = int(dino_model.config.patch_size)
        self.n_skip = 1 + int(getattr(dino_model.config, "num_register_tokens", 0) or 0)
        self.model_id = f"{sd.model_id}+{dino_id}"

    # the SD featurizer's face: prompts, text encoder, posteriors, grid, cells
    unet = property(lambda self: self.sd.unet)
    vae = property(lambda self: self.sd.vae)
    text_encoder = property(lambda self: self.sd.text_encoder)
    tokenizer = property(lambda self: self.sd.tokenizer)
    scheduler = property(lambda self: self.sd.scheduler)
    grid_size = property(lambda self: self.sd.grid_size)  # type: ignore[assignment]

    @property
    def feature_dim(self) -> int:
        return self.sd.feature_dim + int(self.dino.config.hidden_size)

    adapts = True

    def use_adapter(self, adapter) -> "FusedFeaturizer":
        """The SD half reads its UNet with ``adapter`` (DINOv2 stays as it is)."""
        self.sd.use_adapter(adapter)
        return self

    def reconfigure(self, **changes) -> "FusedFeaturizer":
        self.sd.reconfigure(**changes)
        return self

    def cell_map(self, image_size) -> CellMap:
        return self.sd.cell_map(image_size)

    def encode_text(self, text):
        return self.sd.encode_text(text)


    def settings(self) -> dict:
        return {"featurizer": "sd+dinov2", "model": self.model_id, "sd": self.sd.settings(), "dino": self.dino_id, "dino_input": self.dino_input,
                "dino_pos": self.dino_pos,
                "dino_dtype": str(next(self.dino.parameters()).dtype).replace("torch.", "")}

    def dino_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The DINOv2 half before normalisation: pictures (B, 3, R, R) in [0, 1] -> (B, C_dino, h, w)."""
        w, h = self.grid_size
        inp = 2 * x - 1 if self.dino_input == "official" else imagenet_normalize(x)
        inp = F.interpolate(inp, size=(self.patch * h, self.patch * w), mode="bilinear", align_corners=False, antialias=False)
        tok = dino_hidden_states(self.dino, inp.to(next(self.dino.parameters()).dtype), self.dino_pos)[:, self.n_skip :].float()
        return tok.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def forward(self, images=None, *, prompt_embeds=None, text=None, generator=None, posteriors=None, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Fused maps of ``images`` (or of ``pixels``, the (B, 3, R, R) pictures in [0, 1],
        with their ``posteriors`` from a store)."""
        x = self.sd.preprocess(images) if images is not None else pixels
        if x is None:
            raise Sd4MatchError("a fused featurizer needs the pictures (images or pixels)")
        if posteriors is None:
            posteriors = self.sd.posterior(x)
        sd = self.sd(None, prompt_embeds=prompt_embeds, text=text, generator=generator, posteriors=posteriors)
        dn = self.dino_maps(x.to(self.device))
        return torch.cat([0.5 * l2_normalize(sd, dim=1), 0.5 * l2_normalize(dn, dim=1)], dim=1)
