"""Stable Diffusion featurizer: the output of ``unet.up_blocks[k]``, nothing after it.

Pipeline (DESIGN.md): squash to R x R (bilinear), scale to [-1, 1], VAE posterior; a latent
(its mean when ``deterministic_latent``, a sample otherwise) x ``scaling_factor``;
``scheduler.add_noise`` at timestep t; UNet calls over pictures x ensemble copies (up to
``max_batch`` samples a call) with the prompt as ``encoder_hidden_states``; the output of
``up_blocks[k]`` averaged over the ensemble.

The UNet is diffusers' own, unmodified and left as it was found: the early exit calls its
public blocks in order (time embedding, ``conv_in``, ``down_blocks``, ``mid_block``,
``up_blocks[: k + 1]``), which is tested equal to the full forward's ``up_blocks[k]``
output; UNets with class or added embeddings fall back to a forward hook that exists only
during the call. ``compile=True`` compiles that early-exit function and the VAE encoder
with ``torch.compile``.

Random draws: with one ``torch.Generator`` the batch's latent samples are drawn, then its
noise; with a list of generators (one per picture) each picture draws its latent sample
and then its noise from its own generator, so a picture's features do not depend on what
it is batched with.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from sd4match.config import ATTENTION_BACKENDS, TORCH_COMPILE_MODES
from sd4match.errors import Sd4MatchError, first_line, torch_load_problem
from sd4match.features.base import CellMap, Featurizer, ImagesLike, images_to_tensor
from sd4match.features.registry import ResolvedModel, load_from_hub, offline_mode, quiet_loading, resolve
from sd4match.features.text import TextEncoderBridge

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SDFeaturizerConfig:
    timestep: int = 261  # noise level t (DESIGN.md: 261 for training, 261 and 50 at test)
    up_block: int = 1  # read the output of unet.up_blocks[up_block]
    ensemble: int = 8  # noisy copies averaged (1 in training)
    deterministic_latent: bool = False  # VAE latent mean instead of a sample
    resolution: int = 768  # images are squashed to resolution x resolution
    max_batch: int = 32  # most UNet samples per call (pictures x ensemble are chunked to this)
    amp_dtype: str | None = None  # "bf16" / "fp16": autocast; None: the modules' own dtype (see ``.to(dtype=...)``)
    compile: bool = False  # torch.compile the early-exit UNet function and the VAE encoder
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune
    vae_batch: int = 8  # most pictures per VAE call (evaluate and train: every call this size, padded)
    noise_schedule: str = "model"  # the model's own scheduler, or <Class>[:<beta schedule>] (NOISE_SCHEDULERS, BETA_SCHEDULES)
    # kernels only (the features move by float noise, never more; not part of ``settings()``):
    channels_last: bool = False  # the UNet's and VAE's 4-D weights, and their inputs, in channels-last (NHWC) memory format
    attention: str = "auto"  # scaled-dot-product attention backend during the calls: auto (torch's choice) or one of ATTENTION_BACKENDS
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms per shape and keeps the fastest, during the calls only


class _EarlyExit(Exception):
    """Raised by the fallback hook on up_blocks[k] to stop the UNet forward there."""


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


@contextlib.contextmanager
def kernel_settings(attention: str = "auto", cudnn_benchmark: bool = False):
    """Within the block: SDPA restricted to the ``attention`` backend, and cuDNN's
    per-shape algorithm search on; both as they were after it (torch's own switches, which
    are process-wide, are set back even when the block raises). ``attention`` is one of
    ``ATTENTION_BACKENDS`` (the featurizer's settings check it)."""
    with contextlib.ExitStack() as stack:
        if attention != "auto":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                       "math": SDPBackend.MATH}[attention]
            stack.enter_context(sdpa_kernel(backend))
        if cudnn_benchmark:
            was = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            stack.callback(setattr, torch.backends.cudnn, "benchmark", was)
        try:
            yield
        except RuntimeError as e:
            if attention != "auto" and any(m in str(e) for m in ("No available kernel", "No viable backend")):  # CUDA's, the CPU's words
                raise Sd4MatchError(f"attention {attention!r}: torch has no such kernel for these inputs on this device; use --attention auto") from None
            raise

#: ``--noise-schedule`` classes: short name -> diffusers scheduler class
NOISE_SCHEDULERS = {"DDPM": "DDPMScheduler", "DDIM": "DDIMScheduler", "PNDM": "PNDMScheduler", "Euler": "EulerDiscreteScheduler",
                    "EulerAncestral": "EulerAncestralDiscreteScheduler", "DPMSolver": "DPMSolverMultistepScheduler", "LMS": "LMSDiscreteScheduler",
                    "Heun": "HeunDiscreteScheduler"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def parse_noise_schedule(text: str) -> tuple[str | None, str | None]:
    """``model`` -> (None, None); ``DDIM`` -> ("DDIM", None); ``Euler:linear`` -> ("Euler", "linear");
    ``model:linear`` -> (None, "linear"): the model's class with another beta schedule."""
    name, _, beta = str(text).partition(":")
    if name != "model" and name not in NOISE_SCHEDULERS:
        raise Sd4MatchError(f"--noise-schedule {text}: unknown scheduler {name!r}; expected model or one of {', '.join(NOISE_SCHEDULERS)}")
    if beta and beta not in BETA_SCHEDULES:
        raise Sd4MatchError(f"--noise-schedule {text}: unknown beta schedule {beta!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    return (None if name == "model" else name), (beta or None)


def early_exit_supported(unet) -> bool:
    """Whether ``unet_up_to`` covers this UNet (SD 1.x / 2.x: no class, added or hint embeddings)."""
    c = unet.config
    return (getattr(c, "class_embed_type", None) is None and getattr(c, "addition_embed_type", None) is None
            and not getattr(c, "center_input_sample", False) and getattr(unet, "time_embedding", None) is not None)


def unet_up_to(unet, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, k: int,
               keep: Sequence[int] | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
    """The output of ``unet.up_blocks[k]``: the UNet's public blocks called in the order of
    ``UNet2DConditionModel.forward``, stopping after block k (SD 1.x / 2.x UNets). With
    ``keep``, {i: output of ``up_blocks[i]``} for every i in ``keep`` (k = max(keep)), from
    the one pass.

    Shape:
        sample: (N, 4, h, w); timestep: (N,); encoder_hidden_states: (N, L, D) -> (N, C, h', w').
    """
    if keep is not None:
        k = max(keep)
    kept: dict[int, torch.Tensor] = {}
    forward_upsample_size = any(d % (2**unet.num_upsamplers) for d in sample.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
    sample = unet.conv_in(sample)
    res: tuple = (sample,)
    for blk in unet.down_blocks:
        if getattr(blk, "has_cross_attention", False):
            sample, r = blk(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
        else:
            sample, r = blk(hidden_states=sample, temb=emb)
        res += r
    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb, encoder_hidden_states=ehs) if getattr(unet.mid_block, "has_cross_attention", False) else unet.mid_block(sample, emb)
    upsample_size = None
    for i, blk in enumerate(unet.up_blocks[: k + 1]):
        skip, res = res[-len(blk.resnets) :], res[: -len(blk.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = res[-1].shape[2:]
        if getattr(blk, "has_cross_attention", False):
            sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=skip, encoder_hidden_states=ehs, upsample_size=upsample_size)
        else:
            sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=skip, upsample_size=upsample_size)
        if keep is not None and i in keep:
            kept[i] = sample
    return kept if keep is not None else sample


def _vae_posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std


class SDFeaturizer(Featurizer):
    """Dense features of a frozen Stable Diffusion UNet.

    Example:
        >>> feat = SDFeaturizer.from_pretrained("sd-2-1").to("cuda", torch.bfloat16)
        >>> maps = feat(images, text=["a photo of a cat"] * len(images))  # (B, 1280, 48, 48) fp32

    Attributes:
        unet, vae, text_encoder, tokenizer, scheduler: the loaded diffusers / transformers
            objects, unmodified and frozen.
        config: ``SDFeaturizerConfig``.
    """

    takes_prompt = True
    has_posterior = True

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
        if config.channels_last:
            self._memory_format()
        self._compiled: dict = {}
        self._meta: dict = {}  # modules' dtype and device, read once (diffusers walks every module to tell them)
        self._bridge: TextEncoderBridge | None = None
        self._schedulers: dict = {}  # --noise-schedule name -> scheduler
        self.adapter = None  # an ``Adapter`` (LoRA, fine-tuning): applied per call, the UNet itself is never changed
        self._adapter_fp: tuple = (None, None)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._meta = {}  # .to() / .half() / ...: read them again
        return out

    def _module_meta(self, name: str) -> tuple[torch.dtype, torch.device]:
        if name not in self._meta:
            p = next({"unet": self.unet, "vae": self.vae}[name].parameters())
            self._meta[name] = (p.dtype, p.device)
        return self._meta[name]

    @property
    def device(self) -> torch.device:
        return self._module_meta("unet")[1]

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
        max_batch: int = 32,
        amp_dtype: str | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        noise_schedule: str = "model",
        vae_batch: int = 8,
        channels_last: bool = False,
        attention: str = "auto",
        cudnn_benchmark: bool = False,
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
        parse_noise_schedule(noise_schedule)  # named before any weights load
        cfg = SDFeaturizerConfig(timestep, up_block, ensemble, deterministic_latent, resolution, max_batch, amp_dtype, compile,
                                 compile_mode=compile_mode, vae_batch=vae_batch, noise_schedule=noise_schedule, channels_last=channels_last,
                                 attention=attention, cudnn_benchmark=cudnn_benchmark)
        return cls(*parts, config=cfg, model_id=res.model_id)

    # ------------------------------------------------------------------ settings
    def _check_config(self, c: SDFeaturizerConfig) -> None:
        parse_noise_schedule(c.noise_schedule)
        n_up = len(self.unet.up_blocks)
        if not 0 <= c.up_block < n_up:
            raise Sd4MatchError(f"up_block must be in 0..{n_up - 1} for this UNet, got {c.up_block}")
        n_t = self.scheduler.config.num_train_timesteps
        if not 0 <= c.timestep < n_t:
            raise Sd4MatchError(f"timestep must be in 0..{n_t - 1}, got {c.timestep}")
        if c.ensemble < 1 or c.max_batch < 1 or c.vae_batch < 1:
            raise Sd4MatchError("ensemble, max_batch and vae_batch must be at least 1")
        if c.resolution % self.latent_factor:
            raise Sd4MatchError(f"resolution must be a multiple of {self.latent_factor}, got {c.resolution}")
        if c.amp_dtype not in _AMP:
            raise Sd4MatchError(f"amp_dtype must be bf16, fp16 or None, got {c.amp_dtype!r}")
        if c.compile_mode not in TORCH_COMPILE_MODES:
            raise Sd4MatchError(f"compile_mode must be one of {', '.join(TORCH_COMPILE_MODES)}, got {c.compile_mode!r}")
        if c.attention not in ATTENTION_BACKENDS:
            raise Sd4MatchError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {c.attention!r}")

    def reconfigure(self, **changes) -> "SDFeaturizer":
        """Change settings in place (timestep, up_block, ensemble, ...); returns self."""
        cfg = replace(self.config, **changes)
        self._check_config(cfg)
        graph = ("up_block", "compile", "compile_mode", "channels_last", "attention")  # what a compiled graph was traced with
        if any(getattr(cfg, k) != getattr(self.config, k) for k in graph):
            self._compiled = {}
        changed = cfg.channels_last != self.config.channels_last
        self.config = cfg
        if changed:
            self._memory_format()
        return self

    def _memory_format(self) -> None:
        """The UNet's and VAE's 4-D weights in the format ``channels_last`` asks for, set
        when the setting is given or changed (``.to(device, dtype)`` later keeps the format;
        a format the caller gave the modules is otherwise left alone)."""
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        for m in (self.unet, self.vae):
            m.to(memory_format=fmt)

    def _as_format(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) input in the memory format of the weights."""
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    @property
    def resolution(self) -> int:  # type: ignore[override]
        return self.config.resolution

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.grid_of(self.config.up_block)

    def grid_of(self, up_block: int) -> tuple[int, int]:
        """The (w, h) feature grid of ``up_blocks[up_block]`` at this resolution."""
        side = self.config.resolution // self.latent_factor
        for blk in self.unet.down_blocks:
            if getattr(blk, "downsamplers", None):
                side = (side + 1) // 2
        for blk in self.unet.up_blocks[: up_block + 1]:
            if getattr(blk, "upsamplers", None):
                side *= 2
        return side, side

    def dim_of(self, up_block: int) -> int:
        """The channels of ``up_blocks[up_block]``'s output."""
        return self.unet.up_blocks[up_block].resnets[-1].out_channels

    def cell_map(self, image_size) -> CellMap:
        """The official mapping (``CellMap.corners``): x' = x * R / W into the R x R working
        frame, then cell = x' * (w - 1) / (R - 1); back the same way."""
        return CellMap.corners(image_size, self.grid_size, self.config.resolution)

    @property
    def feature_dim(self) -> int:
        return self.dim_of(self.config.up_block)

    @property
    def prompt_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def samples_per_picture(self) -> int:
        return self.config.ensemble

    @property
    def text_bridge(self) -> TextEncoderBridge:
        """The model's frozen CLIP text encoder, as prompts use it."""
        if self._bridge is None:
            self._bridge = TextEncoderBridge(self.text_encoder, self.tokenizer)
        return self._bridge

    def settings(self) -> dict:
        """Everything that changes the features (store keys, run records)."""
        s = asdict(self.config)
        for k in ("max_batch", "compile", "compile_mode", "vae_batch", "channels_last", "attention", "cudnn_benchmark"):
            s.pop(k)
        if s["noise_schedule"] == "model":  # the default leaves the keys of stored maps as they were
            s.pop("noise_schedule")
        if self.adapter is not None:
            s["adapter"] = self.adapter_fingerprint()
        return {"featurizer": "sd", "model": self.model_id, **s, "dtype": str(self._module_meta("unet")[0]).replace("torch.", "")}

    def posterior_settings(self) -> dict:
        """What changes the VAE posterior of a picture."""
        return {"kind": "vae-posterior", "model": self.model_id, "resolution": self.config.resolution, "dtype": str(self._module_meta("vae")[0]).replace("torch.", ""),
                "amp": self.config.amp_dtype}

    # ------------------------------------------------------------------ stages
    def encode_text(self, text: Sequence[str]) -> torch.Tensor:
        """CLIP embeddings of ``text`` with the model's own tokenizer and text encoder.

        Shape:
            returns (len(text), 77, D).
        """
        return self.text_bridge.encode_text(text)

    def preprocess(self, images: ImagesLike) -> torch.Tensor:
        """Pictures squashed to R x R (bilinear), as a (B, 3, R, R) fp32 tensor in [0, 1] on the model's device."""
        return images_to_tensor(images, self.config.resolution, device=self.device)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of pictures at the working resolution, fp32.

        Shape:
            x: (B, 3, R, R) in [0, 1] -> mean, std: (B, 4, R / 8, R / 8).
        """
        fn = self._compiled_fn("vae", lambda: self._compile(_vae_posterior)) if self.config.compile else _vae_posterior
        means, stds = [], []
        with self._autocast(x.device), self._kernels():
            for i in range(0, x.shape[0], self.config.vae_batch):
                m, s = self._call(fn, self.vae, self._as_format((2 * x[i : i + self.config.vae_batch] - 1).to(self._module_meta("vae")[0])))
                means.append(m.float())
                stds.append(s.float())
        return torch.cat(means), torch.cat(stds)

    def noisy_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents drawn from the posterior, each repeated ``ensemble`` times and noised at t.

        With a list of generators, picture i draws its latent sample and then its noise from
        generator i; with one generator, all latent samples, then all noise.

        Shape:
            mean, std: (B, 4, h, w) -> noisy (B * E, 4, h, w), picture-major; timesteps (B * E,).
        """
        e, b = self.config.ensemble, mean.shape[0]

        def randn(shape, g):
            if g is None:
                return torch.randn(shape, device=mean.device, dtype=mean.dtype)
            return torch.randn(shape, generator=g, device=g.device, dtype=mean.dtype).to(mean.device)

        gens = list(generator) if isinstance(generator, (list, tuple)) else None
        if gens is not None and len(gens) != b:
            raise Sd4MatchError(f"{len(gens)} generators for {b} pictures")
        det = self.config.deterministic_latent
        if gens is None:
            z = mean if det else mean + std * randn(mean.shape, generator)
            noise = randn((b * e, *mean.shape[1:]), generator)
        else:
            zs, noises = [], []
            for i, g in enumerate(gens):
                zs.append(mean[i : i + 1] if det else mean[i : i + 1] + std[i : i + 1] * randn(mean[i : i + 1].shape, g))
                noises.append(randn((e, *mean.shape[1:]), g))
            z, noise = torch.cat(zs), torch.cat(noises)
        lat = (z * self.vae.config.scaling_factor).repeat_interleave(e, dim=0)
        t = torch.full((lat.shape[0],), self.config.timestep, device=lat.device, dtype=torch.long)
        return self.add_noise(lat, noise, t), t

    def noise_scheduler(self):
        """The scheduler that noises latents (``noise_schedule``): the model's own, or a
        diffusers class / beta schedule built from the model's scheduler config."""
        name = self.config.noise_schedule
        if name == "model":
            return self.scheduler
        if name not in self._schedulers:
            import diffusers

            cls_name, beta = parse_noise_schedule(name)
            cls = type(self.scheduler) if cls_name is None else getattr(diffusers, NOISE_SCHEDULERS[cls_name])
            self._schedulers[name] = cls.from_config(self.scheduler.config, **({"beta_schedule": beta} if beta else {}))
        return self._schedulers[name]

    def add_noise(self, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Latents noised at t. ``model``: the model's own ``scheduler.add_noise`` (the official
        code's). Any other ``noise_schedule``: sqrt(a_t) x + sqrt(1 - a_t) noise with a_t the
        named scheduler's cumulative alpha, which is what every diffusers scheduler's
        ``add_noise`` is (the sigma-parameterised ones, Euler, LMS, Heun, once scaled by their
        ``scale_model_input``) when used as it is meant to be; their own ``add_noise`` before
        ``set_timesteps`` is not always (DPM-Solver's looks its sigma up in a reversed table).
        So the features depend on the cumulative alphas only: on the beta schedule, not the class."""
        if self.config.noise_schedule == "model":
            return self.scheduler.add_noise(lat, noise, t)
        a = self.noise_scheduler().alphas_cumprod.to(device=lat.device, dtype=lat.dtype)[t].view(-1, *([1] * (lat.ndim - 1)))
        return a**0.5 * lat + (1 - a) ** 0.5 * noise

    def unet_features(self, noisy: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                      layers: Sequence[int] | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
        """The output of ``up_blocks[k]`` for every sample, in calls of up to ``max_batch``;
        with ``layers``, {k: output} of each of them from one pass per call.

        Shape:
            noisy: (N, 4, h, w); t: (N,); prompt_embeds: (N, 77, D) -> (N, C, h', w') fp32.
        """
        outs: list = []
        dt = self._module_meta("unet")[0]
        with self._autocast(noisy.device), self._kernels():
            for i in range(0, noisy.shape[0], self.config.max_batch):
                sl = slice(i, i + self.config.max_batch)
                outs.append(self._up_to(self._as_format(noisy[sl].to(dt)), t[sl], prompt_embeds[sl].to(dt), layers))
        if layers is None:
            return torch.cat([o.float() for o in outs])
        return {k: torch.cat([o[k].float() for o in outs]) for k in layers}

    adapts = True

    def use_adapter(self, adapter) -> "SDFeaturizer":
        """Read the UNet with ``adapter`` (an ``Adapter``, or None for the base model) from now
        on; the UNet module is not changed (see ``sd4match.features.adapters``)."""
        self.adapter = adapter  # compiled early exits stay: with an adapter the UNet runs eager, without one they serve again
        return self

    def adapter_fingerprint(self) -> str:
        """The adapter's content name, recomputed only after its tensors changed."""
        version = tuple(p._version for p in self.adapter.parameters())
        if self._adapter_fp[0] != (id(self.adapter), version):
            self._adapter_fp = ((id(self.adapter), version), self.adapter.fingerprint())
        return self._adapter_fp[1]

    def _up_to(self, sample, t, ehs, layers: Sequence[int] | None = None):
        if self.adapter is not None:  # the adapted weights in place for this call only
            over = {f"unet.{k}": v for k, v in self.adapter.overrides(self.unet).items()}
            return torch.func.functional_call(_UNetCall(self, layers), over, (sample, t, ehs), strict=False)
        return self._base_up_to(sample, t, ehs, layers)

    def _base_up_to(self, sample, t, ehs, layers: Sequence[int] | None = None):
        keep = tuple(sorted(set(layers))) if layers is not None else None
        k = self.config.up_block if keep is None else keep[-1]
        if early_exit_supported(self.unet):
            if self.config.compile and self.adapter is None:  # an adapter's weights change per call: eager
                fn = self._compiled_fn(("unet", k, keep), lambda: self._compile(unet_up_to))
                return self._call(fn, self.unet, sample, t, ehs, k, keep)
            return unet_up_to(self.unet, sample, t, ehs, k, keep)
        return self._hooked(sample, t, ehs, keep)

    def _hooked(self, sample, t, ehs, layers: Sequence[int] | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
        """The fallback: the full forward with hooks on the ``up_blocks`` asked for (default:
        ``up_block``, whose output is returned), which exist only during this call; the
        deepest one stops the forward."""
        if layers is None:
            return self._hooked(sample, t, ehs, (self.config.up_block,))[self.config.up_block]
        box: dict[int, torch.Tensor] = {}
        last = max(layers)

        def capture(i):
            def hook(module, args, output):
                box[i] = output[0] if isinstance(output, tuple) else output
                if i == last:
                    raise _EarlyExit
            return hook

        hs = [self.unet.up_blocks[i].register_forward_hook(capture(i)) for i in layers]
        try:
            self.unet(sample, t, encoder_hidden_states=ehs, return_dict=False)
        except _EarlyExit:
            pass
        finally:
            for h in hs:
                h.remove()
        if len(box) != len(set(layers)):  # pragma: no cover - the hooks always fire
            raise RuntimeError("the up_blocks hooks did not fire")
        return box

    def _compiled_fn(self, name, make):
        if name not in self._compiled:
            self._compiled[name] = make()
        return self._compiled[name]

    def _compile(self, fn):
        """``torch.compile(fn)`` for static shapes: each call size gets its own graph
        (``dynamic=False``). Evaluation and training pad every call to its fixed size so that
        graphs can be static; torch.compile's default would instead turn the batch dimension
        symbolic on the first recompile for a second size (training's validation calls, a
        last partial call) and run that dynamic graph for every size from then on."""
        mode = self.config.compile_mode
        return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)

    def _call(self, fn, *args):
        """``fn(*args)``; under CUDA graphs (``reduce-overhead``, ``max-autotune``) a new graph
        step, and the outputs cloned out of the graph's memory, which the next replay reuses."""
        if not (self.config.compile and self.config.compile_mode != "default"):
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
        if isinstance(out, dict):
            return {k: v.clone() for k, v in out.items()}
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _autocast(self, device: torch.device):
        """Mixed precision for the VAE and UNet when ``amp_dtype`` is set."""
        dt = _AMP[self.config.amp_dtype]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dt)

    def _kernels(self):
        """The attention backend and cuDNN's algorithm search of the settings, for one call."""
        return kernel_settings(self.config.attention, self.config.cudnn_benchmark)

    # ------------------------------------------------------------------ call
    def forward(
        self,
        images: ImagesLike | None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        text: Sequence[str] | None = None,
        generator: Generators = None,
        posteriors: tuple[torch.Tensor, torch.Tensor] | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """Feature maps of ``images``; with ``layers``, {k: maps of ``up_blocks[k]``} for each,
        from one early-exit pass that stops at the deepest (the same draws, so each equals
        the single-layer call with ``up_block=k``).

        Args:
            images: (B, 3, H, W) float tensor in [0, 1], or a list of PIL images (None when
                ``posteriors`` are given).
            prompt_embeds: (B, 77, D) or (1, 77, D) prompt embeddings (learned prompts);
                gradients flow into them.
            text: B strings (or one) encoded with the model's tokenizer and text encoder.
                With neither, the empty prompt "".
            generator: one generator, or one per picture: drives every random draw.
            posteriors: (mean, std) of the pictures (``posterior``), e.g. from the store:
                the VAE does not run.

        Shape:
            returns (B, C, h, w) float32, e.g. (B, 1280, 48, 48) for SD 2.1 at 768.
        """
        dev = self.device
        if posteriors is None:
            if images is None:
                raise Sd4MatchError("give images or their posteriors")
            posteriors = self.posterior(self.preprocess(images))
        mean, std = (p.to(dev, torch.float32) for p in posteriors)
        b = mean.shape[0]
        if prompt_embeds is not None and text is not None:
            raise Sd4MatchError("give prompt_embeds or text, not both")
        if prompt_embeds is None:
            text = [""] if text is None else [text] if isinstance(text, str) else list(text)
            prompt_embeds = self.encode_text(text)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] not in (1, b) or prompt_embeds.shape[-1] != self.prompt_dim:
            raise Sd4MatchError(f"prompt_embeds must be (1 or {b}, L, {self.prompt_dim}), got {tuple(prompt_embeds.shape)}")
        e = self.config.ensemble
        with torch.no_grad():
            noisy, t = self.noisy_latents(mean, std, generator)
        cond = prompt_embeds.to(dev).expand(b, -1, -1).repeat_interleave(e, dim=0)
        if layers is not None:
            n_up = len(self.unet.up_blocks)
            if not layers or any(not 0 <= k < n_up for k in layers):
                raise Sd4MatchError(f"layers must be in 0..{n_up - 1} for this UNet, got {list(layers)}")
            got = self.unet_features(noisy, t, cond, layers)
            return {k: f.view(b, e, *f.shape[1:]).mean(dim=1) for k, f in got.items()}
        feats = self.unet_features(noisy, t, cond)
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
            inside = f"; it is the {root.name}/ of the diffusers folder {root.parent}: pass that" if (root.parent / "model_index.json").is_file() else ""
            raise Sd4MatchError(f"{root}: not a Stable Diffusion folder in the diffusers layout ({missing[0]}/ is missing){inside}")
        return _load_parts(str(root), None, local_files_only=True)
    if res.kind == "hub":
        return load_from_hub(lambda local: _load_parts(res.location, res.revision, local_files_only=local), "Stable Diffusion", res, offline)
    if res.kind == "single_file":
        return _load_single_file(Path(res.location), config=config, offline=offline)
    raise Sd4MatchError(f"{res.location}: not a Stable Diffusion model")


def _load_parts(where: str, revision: str | None, *, local_files_only: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"revision": revision, "local_files_only": local_files_only}
    with quiet_loading():
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
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw)
    except Exception as e:
        msg = first_line(e)
        if reason := torch_load_problem(e, known_only=True):  # what torch said, under diffusers' wrapping
            hint = "; use the model's .safetensors file or its diffusers folder" if "Python objects" in reason else ""
            raise Sd4MatchError(f"{path}: cannot read checkpoint ({reason}){hint}") from None
        if any(s in msg.lower() for s in ("header", "deserializ", "incomplete", "corrupt", "unpickl", "eof", "invalid load key", "zip", "unable to load weights")):
            raise Sd4MatchError(f"{path}: cannot read checkpoint (truncated or corrupt: {msg})") from None
        hint = "" if config else " Pass --model-config with the diffusers folder or hub id that matches this checkpoint."
        raise Sd4MatchError(f"{path}: cannot load as a Stable Diffusion checkpoint ({msg}).{hint}") from None
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler


class _UNetCall(torch.nn.Module):
    """The featurizer's UNet read as a module whose only child is the UNet, so that
    ``functional_call`` can put adapted weights in place (``unet.<name>``) for one call."""

    def __init__(self, feat: SDFeaturizer, layers):
        super().__init__()
        self.unet = feat.unet
        object.__setattr__(self, "_feat", feat)  # not a child: its other modules stay out of the call
        self._layers = layers

    def forward(self, sample, t, ehs):
        return self._feat._base_up_to(sample, t, ehs, self._layers)


class SDFace:
    """What a featurizer built on an ``SDFeaturizer`` (``self.sd``) hands on from it: its
    settings, working size, prompt width, text encoder, batching and device."""

    config = property(lambda self: self.sd.config)
    resolution = property(lambda self: self.sd.resolution)
    prompt_dim = property(lambda self: self.sd.prompt_dim)
    text_bridge = property(lambda self: self.sd.text_bridge)
    max_batch = property(lambda self: self.sd.max_batch)
    samples_per_picture = property(lambda self: self.sd.samples_per_picture)
    device = property(lambda self: self.sd.device)

    def preprocess(self, images):
        return self.sd.preprocess(images)

    def posterior(self, x):
        return self.sd.posterior(x)

    def posterior_settings(self) -> dict:
        return self.sd.posterior_settings()


class SDLayerStack(SDFace, Featurizer):
    """An ``SDFeaturizer`` read at several ``up_blocks`` from one early-exit pass.

    It behaves as its featurizer (prompts, posteriors, batching) and returns each picture's
    maps of every layer packed into one row (``unpack`` gives them back), so the batching
    and the store treat the layers as one map; ``view(k)`` maps pixels to layer k's cells.

    Shape:
        ``forward`` returns (B, sum of C_k h_k w_k) fp32.
    """

    takes_prompt = True
    has_posterior = True

    def __init__(self, sd: SDFeaturizer, layers: Sequence[int]):
        super().__init__()
        self.sd = sd
        self.layers = tuple(sorted(set(int(k) for k in layers)))
        self.model_id = sd.model_id

    grid_size = property(lambda self: self.sd.grid_of(self.layers[-1]))  # type: ignore[assignment]

    @property
    def feature_dim(self) -> int:
        return sum(self.sd.dim_of(k) for k in self.layers)

    def settings(self) -> dict:
        return {**self.sd.settings(), "up_block": list(self.layers)}

    def cell_map(self, image_size) -> CellMap:
        return self.view(self.layers[-1]).cell_map(image_size)

    def view(self, up_block: int) -> "LayerView":
        """Layer ``up_block``'s cell mapping (what ``match_pixels`` asks of a featurizer)."""
        return LayerView(self.sd.grid_of(up_block), self.sd.resolution)

    def forward(self, images=None, *, prompt_embeds=None, text=None, generator=None, posteriors=None) -> torch.Tensor:
        maps = self.sd(images, prompt_embeds=prompt_embeds, text=text, generator=generator, posteriors=posteriors, layers=self.layers)
        return torch.cat([maps[k].flatten(1) for k in self.layers], dim=1)

    def unpack(self, packed: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, N) packed rows -> {k: (B, C_k, h_k, w_k)}."""
        out, i = {}, 0
        for k in self.layers:
            (w, h), c = self.sd.grid_of(k), self.sd.dim_of(k)
            out[k] = packed[:, i : i + c * h * w].reshape(packed.shape[0], c, h, w)
            i += c * h * w
        return out


@dataclass(frozen=True)
class LayerView:
    """One layer's grid: its cell mapping (the official corners mapping at ``resolution``)."""

    grid_size: tuple[int, int]
    resolution: int

    def cell_map(self, image_size) -> CellMap:
        return CellMap.corners(image_size, self.grid_size, self.resolution)
