"""Stable Diffusion featurizer: the output of ``unet.up_blocks[k]``, nothing after it.

Pipeline (DESIGN.md): squash to R x R, scale to [-1, 1], VAE encode (latent mean when
``deterministic_latent``, a sample otherwise) x ``scaling_factor``, ``scheduler.add_noise``
at timestep t, one UNet call over images x ensemble copies with the prompt as
``encoder_hidden_states``, the output of ``up_blocks[k]`` averaged over the ensemble.

The UNet is diffusers' own, unmodified. A forward hook on ``up_blocks[k]`` stores its
output and raises ``_EarlyExit``, which ends the forward there: no later up block, no
``conv_norm_out`` and no ``conv_out`` run.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from sd4match.errors import Sd4MatchError, first_line
from sd4match.features.base import CellMap, Featurizer, ImagesLike, images_to_tensor
from sd4match.features.registry import ResolvedModel, offline_mode, resolve, weights_missing


@dataclass(frozen=True)
class SDFeaturizerConfig:
    timestep: int = 261  # noise level t (DESIGN.md: 261 for training, 261 and 50 at test)
    up_block: int = 1  # read the output of unet.up_blocks[up_block]
    ensemble: int = 8  # noisy copies averaged (1 in training)
    deterministic_latent: bool = False  # VAE latent mean instead of a sample
    resolution: int = 768  # images are squashed to resolution x resolution
    max_batch: int = 8  # most UNet samples per call (images x ensemble are chunked to this)
    amp_dtype: str | None = None  # "bf16" / "fp16": autocast (GPU; bf16 also on CPU); None: the modules' own dtype


class _EarlyExit(Exception):
    """Raised by the hook on up_blocks[k] to stop the UNet forward there."""


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


class SDFeaturizer(Featurizer):
    """Dense features of a frozen Stable Diffusion UNet.

    Example:
        >>> feat = SDFeaturizer.from_pretrained("sd-2-1").to("cuda")
        >>> maps = feat(images, text=["a photo of a cat"] * len(images))  # (B, 1280, 48, 48)

    Attributes:
        unet, vae, text_encoder, tokenizer, scheduler: the loaded diffusers / transformers
            objects, unmodified and frozen.
        config: ``SDFeaturizerConfig``.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, config: SDFeaturizerConfig = SDFeaturizerConfig(), model_id: str = "unknown"):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.model_id = model_id
        self.config = config
        self._check_config(config)
        for m in (unet, vae, text_encoder):
            m.eval()
            m.requires_grad_(False)
        self._captured: torch.Tensor | None = None
        self._hook = None
        self._set_hook()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        timestep: int = 261,
        up_block: int = 1,
        ensemble: int = 8,
        deterministic_latent: bool = False,
        resolution: int = 768,
        max_batch: int = 8,
        amp_dtype: str | None = None,
        config: str | Path | None = None,
        local_files_only: bool | None = None,
    ) -> "SDFeaturizer":
        """Load Stable Diffusion from a registry name, hub id, diffusers folder or single file.

        Args:
            model: ``sd-2-1`` / ``sd-1-5``, ``owner/name[@revision]``, a folder in the
                diffusers layout, or a ``.safetensors`` / ``.ckpt`` checkpoint.
            config: for a single file, the diffusers folder or hub id that holds the
                matching component configs (default: inferred by diffusers from the
                checkpoint, which needs them cached or the hub reachable).
            local_files_only: never contact the hub (default: ``HF_HUB_OFFLINE``).

        The modules load in fp32 on the CPU; move them with ``.to(device, dtype)``.
        """
        res = resolve(model)
        if res.kind == "builtin":
            raise Sd4MatchError(f"{model}: not a Stable Diffusion model (use sd4match.features.load_featurizer)")
        parts = load_sd_components(res, config=config, local_files_only=local_files_only)
        cfg = SDFeaturizerConfig(timestep, up_block, ensemble, deterministic_latent, resolution, max_batch, amp_dtype)
        return cls(*parts, config=cfg, model_id=res.model_id)

    # ------------------------------------------------------------------ settings
    def _check_config(self, c: SDFeaturizerConfig) -> None:
        n_up = len(self.unet.up_blocks)
        if not 0 <= c.up_block < n_up:
            raise Sd4MatchError(f"up_block must be in 0..{n_up - 1} for this UNet, got {c.up_block}")
        n_t = self.scheduler.config.num_train_timesteps
        if not 0 <= c.timestep < n_t:
            raise Sd4MatchError(f"timestep must be in 0..{n_t - 1}, got {c.timestep}")
        if c.ensemble < 1 or c.max_batch < 1:
            raise Sd4MatchError("ensemble and max_batch must be at least 1")
        if c.resolution % self.latent_factor:
            raise Sd4MatchError(f"resolution must be a multiple of {self.latent_factor}, got {c.resolution}")
        if c.amp_dtype not in _AMP:
            raise Sd4MatchError(f"amp_dtype must be bf16, fp16 or None, got {c.amp_dtype!r}")

    def reconfigure(self, **changes) -> "SDFeaturizer":
        """Change settings in place (timestep, up_block, ensemble, ...); returns self."""
        cfg = replace(self.config, **changes)
        self._check_config(cfg)
        self.config = cfg
        self._set_hook()
        return self

    def _set_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self.unet.up_blocks[self.config.up_block].register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self._captured = output[0] if isinstance(output, tuple) else output
        raise _EarlyExit

    @property
    def resolution(self) -> int:  # type: ignore[override]
        return self.config.resolution

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.config.resolution // self.latent_factor
        for blk in self.unet.down_blocks:
            if getattr(blk, "downsamplers", None):
                side = (side + 1) // 2
        for blk in self.unet.up_blocks[: self.config.up_block + 1]:
            if getattr(blk, "upsamplers", None):
                side *= 2
        return side, side

    def cell_map(self, image_size) -> CellMap:
        """The official mapping (``CellMap.corners``): x' = x * R / W into the R x R working
        frame, then cell = x' * (w - 1) / (R - 1); back the same way."""
        return CellMap.corners(image_size, self.grid_size, self.config.resolution)

    @property
    def feature_dim(self) -> int:
        blk = self.unet.up_blocks[self.config.up_block]
        return blk.resnets[-1].out_channels

    @property
    def prompt_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    def settings(self) -> dict:
        return {"featurizer": "sd", "model": self.model_id, **asdict(self.config), "max_batch": None}

    # ------------------------------------------------------------------ stages
    def encode_text(self, text: Sequence[str]) -> torch.Tensor:
        """CLIP embeddings of ``text`` with the model's own tokenizer and text encoder.

        Shape:
            returns (len(text), 77, D).
        """
        from sd4match.prompts.base import TextEncoderBridge

        return TextEncoderBridge(self.text_encoder, self.tokenizer).encode_text(text)

    def encode_images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents x scaling factor of images in [0, 1] at the working resolution.

        Shape:
            x: (B, 3, R, R) -> (B, 4, R / 8, R / 8).
        """
        dist = self.vae.encode((2 * x - 1).to(self.vae.dtype)).latent_dist
        z = dist.mean if self.config.deterministic_latent else dist.sample(generator=generator)
        return z * self.vae.config.scaling_factor

    def add_noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat each latent ``ensemble`` times and noise it at the configured timestep.

        Shape:
            latents: (B, 4, h, w) -> noisy (B * E, 4, h, w), image-major; and the timesteps (B * E,).
        """
        e = self.config.ensemble
        lat = latents.repeat_interleave(e, dim=0)
        noise = torch.randn(lat.shape, generator=generator, device=lat.device, dtype=lat.dtype) if generator is not None else torch.randn_like(lat)
        t = torch.full((lat.shape[0],), self.config.timestep, device=lat.device, dtype=torch.long)
        return self.scheduler.add_noise(lat, noise, t), t

    def unet_features(self, noisy: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Run the UNet up to ``up_blocks[k]`` and return that block's output.

        Shape:
            noisy: (N, 4, h, w); t: (N,); prompt_embeds: (N, 77, D) -> (N, C, h', w').
        """
        self._captured = None
        try:
            self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=prompt_embeds.to(self.unet.dtype), return_dict=False)
        except _EarlyExit:
            pass
        else:  # pragma: no cover - the hook always fires
            raise RuntimeError("the up_blocks hook did not fire")
        out, self._captured = self._captured, None
        return out

    def _autocast(self, device: torch.device):
        """Mixed precision for the VAE and UNet; the ensemble mean and everything after it is fp32."""
        dt = _AMP[self.config.amp_dtype]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dt)

    def compile_blocks(self, **kwargs) -> "SDFeaturizer":
        """``torch.compile`` each UNet block that runs (regional compilation), in place.

        The early-exit hook stays outside the compiled regions. Keyword arguments go to
        ``nn.Module.compile`` (e.g. ``mode="max-autotune"``). Returns self.
        """
        blocks = [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks[: self.config.up_block + 1]]
        for blk in blocks:
            for sub in blk.children():  # resnets / attentions / samplers lists: compile their members
                for m in sub if isinstance(sub, torch.nn.ModuleList) else [sub]:
                    m.compile(**kwargs)
        return self

    # ------------------------------------------------------------------ call
    def forward(
        self,
        images: ImagesLike,
        *,
        prompt_embeds: torch.Tensor | None = None,
        text: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Feature maps of ``images``.

        Args:
            images: (B, 3, H, W) float tensor in [0, 1], or a list of PIL images.
            prompt_embeds: (B, 77, D) or (1, 77, D) prompt embeddings (learned prompts);
                gradients flow into them.
            text: B strings (or one) encoded with the model's tokenizer and text encoder.
                With neither, the empty prompt "".
            generator: drives every random draw (latent sample, noise).

        Shape:
            returns (B, C, h, w) float32, e.g. (B, 1280, 48, 48) for SD 2.1 at 768.
        """
        dev = self.unet.device
        x = images_to_tensor(images, self.config.resolution, device=dev)
        b = x.shape[0]
        if prompt_embeds is not None and text is not None:
            raise Sd4MatchError("give prompt_embeds or text, not both")
        if prompt_embeds is None:
            text = [""] if text is None else [text] if isinstance(text, str) else list(text)
            prompt_embeds = self.encode_text(text)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] not in (1, b) or prompt_embeds.shape[-1] != self.prompt_dim:
            raise Sd4MatchError(f"prompt_embeds must be (1 or {b}, L, {self.prompt_dim}), got {tuple(prompt_embeds.shape)}")
        prompt_embeds = prompt_embeds.expand(b, -1, -1).to(dev)
        e = self.config.ensemble
        with self._autocast(dev):
            with torch.no_grad():
                latents = self.encode_images(x, generator)
                noisy, t = self.add_noise(latents.float(), generator)
            cond = prompt_embeds.repeat_interleave(e, dim=0)
            chunks = [
                self.unet_features(noisy[i : i + self.config.max_batch], t[i : i + self.config.max_batch], cond[i : i + self.config.max_batch])
                for i in range(0, noisy.shape[0], self.config.max_batch)
            ]
        feats = torch.cat(chunks).float()
        return feats.view(b, e, *feats.shape[1:]).mean(dim=1)

    def extra_repr(self) -> str:
        return f"model={self.model_id!r}, config={self.config}"


def load_sd_components(res: ResolvedModel, *, config=None, local_files_only: bool | None = None):
    """(unet, vae, text_encoder, tokenizer, scheduler) from a resolved model source.

    Raises:
        Sd4MatchError: weights absent offline (with how to get them), a folder that is not
            in the diffusers layout, or an unreadable checkpoint.
    """
    offline = offline_mode(local_files_only)
    if res.kind == "folder":
        root = Path(res.location)
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / s).is_dir()]
        if missing:
            raise Sd4MatchError(f"{root}: not a Stable Diffusion folder in the diffusers layout ({missing[0]}/ is missing)")
        return _load_parts(str(root), None, local_files_only=True)
    if res.kind == "hub":
        try:
            return _load_parts(res.location, res.revision, local_files_only=offline)
        except Sd4MatchError:
            raise
        except Exception as e:  # hub and cache errors come in many types; all mean "not here"
            raise weights_missing("Stable Diffusion", res, offline, e) from None
    if res.kind == "single_file":
        return _load_single_file(Path(res.location), config=config, offline=offline)
    raise Sd4MatchError(f"{res.location}: not a Stable Diffusion model")


def _load_parts(where: str, revision: str | None, *, local_files_only: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    import warnings

    kw = {"revision": revision, "local_files_only": local_files_only}
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kw)
    tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
    scheduler = _load_scheduler(where, kw)
    return unet, vae, text_encoder, tokenizer, scheduler


def _load_scheduler(where: str, kw: dict):
    """The scheduler class named in the model's own config (DDIM for SD 2.1, PNDM for SD 1.5)."""
    import diffusers

    cfg, *_ = diffusers.DDIMScheduler.load_config(where, subfolder="scheduler", return_unused_kwargs=True, return_commit_hash=True, **kw)
    cls = getattr(diffusers, cfg.get("_class_name", "DDIMScheduler"), None)
    if cls is None or not hasattr(cls, "add_noise"):
        cls = diffusers.DDIMScheduler
    return cls.from_config(cfg)


def check_safetensors(path: Path) -> None:
    """Raise a one-line error if a .safetensors file is truncated or its header is broken."""
    import json

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise Sd4MatchError(f"{path}: cannot read checkpoint (truncated or corrupt: {e})") from None
    if 8 + n + end > size:
        raise Sd4MatchError(f"{path}: cannot read checkpoint (truncated or corrupt: {size} bytes, the header promises {8 + n + end})")


def _load_single_file(path: Path, *, config, offline: bool):
    from diffusers import StableDiffusionPipeline

    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
    kw = {"local_files_only": offline}
    if config is not None:
        kw["config"] = str(config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw)
    except Exception as e:
        msg = first_line(e)
        if any(s in msg.lower() for s in ("header", "deserializ", "incomplete", "corrupt", "unpickl", "eof", "invalid load key", "zip", "unable to load weights")):
            raise Sd4MatchError(f"{path}: cannot read checkpoint (truncated or corrupt: {msg})") from None
        hint = "" if config else " Pass --model-config with the diffusers folder or hub id that matches this checkpoint."
        raise Sd4MatchError(f"{path}: cannot load as a Stable Diffusion checkpoint ({msg}).{hint}") from None
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
