"""Tiny random models built from config, for our tests and for users' CI.

They are saved in exactly the layouts the real weights come in (a diffusers pipeline
folder; a transformers model folder), so loading them exercises the same code path as
loading Stable Diffusion 2.1 or DINOv2. No network is touched: the CLIP tokenizer is
built from a byte-level vocabulary (every byte, alone and word-final, plus BOS/EOS) with
no merges.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Literal

import torch

from sd4match.features.registry import quiet_loading

SdStyle = Literal["sd1", "sd2"]

#: Channel widths of the tiny UNet: 3 levels, like SD's 4 but smaller. up_blocks[1] is a
#: cross-attention block with an upsampler, as in SD.
TINY_UNET_CHANNELS = (16, 32, 32)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes used by CLIP's byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(folder: str | Path):
    """A CLIPTokenizer over a 514-token byte-level vocabulary, written to and read from ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sd_components(*, seed: int = 0, style: SdStyle = "sd2", tokenizer_dir: str | Path):
    """UNet, VAE, CLIP text encoder, tokenizer and scheduler with random weights.

    ``style="sd1"``: 24-d cross-attention without linear projection, head count given as
    ``attention_head_dim`` (SD 1.x conventions, quick-GELU text encoder, epsilon
    prediction). ``style="sd2"``: 32-d cross-attention with linear projection, per-block
    head dims, GELU text encoder, v-prediction (SD 2.1 conventions).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if style not in ("sd1", "sd2"):
        raise ValueError(f"unknown style {style!r}; expected sd1 or sd2")
    sd2 = style == "sd2"
    cross = 32 if sd2 else 24
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=TINY_UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=cross,
        attention_head_dim=(2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=cross,
            intermediate_size=2 * cross,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=cross,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513 if not sd2 else 0,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    for m in (unet, vae, text_encoder):
        m.eval()
    return unet, vae, text_encoder, tokenizer, scheduler


def tiny_sd(path: str | Path, *, seed: int = 0, style: SdStyle = "sd2") -> Path:
    """Write a tiny random Stable Diffusion in the diffusers folder layout; return ``path``.

    The folder loads with ``SDFeaturizer.from_pretrained(path)`` and with diffusers'
    ``StableDiffusionPipeline.from_pretrained(path)``.
    """
    import tempfile

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, _quiet_writing():
        from diffusers import StableDiffusionPipeline

        unet, vae, text_encoder, tokenizer, scheduler = tiny_sd_components(seed=seed, style=style, tokenizer_dir=tmp)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
    return path


@contextlib.contextmanager
def _quiet_writing():
    """transformers' notices (the pipeline's import names optional packages such as
    torchvision) and its "Writing model shards" bars unsaid while a tiny model is written;
    both as they were afterwards."""
    from transformers.utils import logging as tlog

    verbosity = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        with quiet_loading():
            yield
    finally:
        tlog.set_verbosity(verbosity)


def tiny_dinov2(path: str | Path, *, seed: int = 0, image_size: int = 518) -> Path:
    """Write a tiny random transformers ``Dinov2Model`` (patch 14) with DINOv2's own position
    grid (``image_size`` 518: 37 x 37, so a 224 input interpolates it as the real model does);
    return ``path``."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=14, image_size=image_size)
    )
    with _quiet_writing():
        model.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


# ---------------------------------------------------------------------------------------
# Single-file checkpoints: write a diffusers folder as one original-layout (LDM) file, the
# format of the distributed `v2-1_768-ema-pruned.safetensors`, so the single-file loading
# path can be tested offline. The key layout is that of the CompVis / Stability AI code
# (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*).

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(sd: dict, src_prefix: str, dst_prefix: str, inner: dict | None = None) -> dict:
    out = {}
    for k, v in sd.items():
        if not k.startswith(src_prefix):
            continue
        rest = k[len(src_prefix):]
        for a, b in (inner or {}).items():
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
                break
        out[dst_prefix + rest] = v
    return out


def unet_to_ldm(unet) -> dict:
    """UNet2DConditionModel weights under the original ``model.diffusion_model.`` keys."""
    sd, cfg, out = unet.state_dict(), unet.config, {}
    P = "model.diffusion_model."
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2"}
    for a, b in fixed.items():
        out.update(_rename(sd, a + ".", P + b + "."))
    L = cfg.layers_per_block
    for i, blk in enumerate(unet.down_blocks):
        for j in range(len(blk.resnets)):
            n = 1 + i * (L + 1) + j
            out.update(_rename(sd, f"down_blocks.{i}.resnets.{j}.", f"{P}input_blocks.{n}.0.", _RESNET_UNET))
            out.update(_rename(sd, f"down_blocks.{i}.attentions.{j}.", f"{P}input_blocks.{n}.1."))
        if blk.downsamplers:
            out.update(_rename(sd, f"down_blocks.{i}.downsamplers.0.conv.", f"{P}input_blocks.{(i + 1) * (L + 1)}.0.op."))
    out.update(_rename(sd, "mid_block.resnets.0.", f"{P}middle_block.0.", _RESNET_UNET))
    out.update(_rename(sd, "mid_block.attentions.0.", f"{P}middle_block.1."))
    out.update(_rename(sd, "mid_block.resnets.1.", f"{P}middle_block.2.", _RESNET_UNET))
    for i, blk in enumerate(unet.up_blocks):
        n_layers = len(blk.resnets)
        for j in range(n_layers):
            n = i * n_layers + j
            out.update(_rename(sd, f"up_blocks.{i}.resnets.{j}.", f"{P}output_blocks.{n}.0.", _RESNET_UNET))
            out.update(_rename(sd, f"up_blocks.{i}.attentions.{j}.", f"{P}output_blocks.{n}.1."))
        if blk.upsamplers:
            pos = 2 if getattr(blk, "attentions", None) else 1
            out.update(_rename(sd, f"up_blocks.{i}.upsamplers.0.conv.", f"{P}output_blocks.{i * n_layers + n_layers - 1}.{pos}.conv."))
    if len(out) != len(sd):
        raise RuntimeError(f"UNet export covered {len(out)} of {len(sd)} tensors")
    return out


def vae_to_ldm(vae) -> dict:
    """AutoencoderKL weights under the original ``first_stage_model.`` keys."""
    sd, out = vae.state_dict(), {}
    P = "first_stage_model."
    res = {"conv_shortcut": "nin_shortcut"}
    for a in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out"):
        out.update(_rename(sd, a + ".", P + a + "."))
    for part in ("encoder", "decoder"):
        out.update(_rename(sd, f"{part}.conv_norm_out.", f"{P}{part}.norm_out."))
        out.update(_rename(sd, f"{part}.mid_block.resnets.0.", f"{P}{part}.mid.block_1.", res))
        out.update(_rename(sd, f"{part}.mid_block.resnets.1.", f"{P}{part}.mid.block_2.", res))
        attn = _rename(sd, f"{part}.mid_block.attentions.0.", f"{P}{part}.mid.attn_1.", _VAE_ATTN)
        out.update({k: (v[:, :, None, None] if v.ndim == 2 else v) for k, v in attn.items()})  # linear -> 1x1 conv
    n = len(vae.encoder.down_blocks)
    for i in range(n):
        out.update(_rename(sd, f"encoder.down_blocks.{i}.resnets.", f"{P}encoder.down.{i}.block.", None))
        out.update(_rename(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"{P}encoder.down.{i}.downsample.conv."))
        out.update(_rename(sd, f"decoder.up_blocks.{i}.resnets.", f"{P}decoder.up.{n - 1 - i}.block.", None))
        out.update(_rename(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"{P}decoder.up.{n - 1 - i}.upsample.conv."))
    out = {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in out.items()}
    if len(out) != len(sd):
        raise RuntimeError(f"VAE export covered {len(out)} of {len(sd)} tensors")
    return out


def text_encoder_to_ldm(text_encoder, open_clip: bool) -> dict:
    """CLIP text encoder weights: HF layout under ``cond_stage_model.transformer.`` (SD 1.x)
    or OpenCLIP layout under ``cond_stage_model.model.`` (SD 2.x, fused q/k/v)."""
    # transformers 5 drops the "text_model." level from CLIPTextModel keys; checkpoints keep it
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.state_dict().items()}
    if not open_clip:
        return {"cond_stage_model.transformer." + k: v for k, v in sd.items() if not k.endswith("position_ids")}
    P, out = "cond_stage_model.model.", {}
    out[P + "token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out[P + "positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out[P + "ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out[P + "ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    for i in range(text_encoder.config.num_hidden_layers):
        s, d = f"text_model.encoder.layers.{i}.", f"{P}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[d + f"attn.in_proj_{w}"] = torch.cat([sd[s + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
            out[d + f"attn.out_proj.{w}"] = sd[s + f"self_attn.out_proj.{w}"]
            out[d + f"ln_1.{w}"] = sd[s + f"layer_norm1.{w}"]
            out[d + f"ln_2.{w}"] = sd[s + f"layer_norm2.{w}"]
            out[d + f"mlp.c_fc.{w}"] = sd[s + f"mlp.fc1.{w}"]
            out[d + f"mlp.c_proj.{w}"] = sd[s + f"mlp.fc2.{w}"]
    return out


def write_single_file(folder: str | Path, path: str | Path) -> Path:
    """Write the diffusers Stable Diffusion ``folder`` as one original-layout checkpoint.

    ``.safetensors`` or ``.ckpt`` (a plain ``{"state_dict": ...}`` torch file, loadable with
    ``weights_only=True``), by the suffix of ``path``. Load it back with
    ``SDFeaturizer.from_pretrained(path, config=folder)``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, path = Path(folder), Path(path)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_encoder_to_ldm(te, open_clip=bool(unet.config.use_linear_projection))}
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


class WorkCounter:
    """What the frozen models do, seen through forward hooks (removed by ``close``): the
    pictures of each VAE call and each DINOv2 call (by the SHA-1 of their input rows), and
    the samples of each UNet call (at ``conv_in``).

    Example:
        >>> w = WorkCounter(feat, dino)
        >>> ...  # evaluate, train
        >>> w.close(); assert len(w.vae) == len(set(w.vae))  # each picture through the VAE once
    """

    def __init__(self, feat, dino=None):
        import hashlib

        self.vae_calls: list[list[str]] = []
        self.dino_calls: list[list[str]] = []
        self.unet: list[int] = []
        digest = lambda x: hashlib.sha1(x.detach().cpu().numpy().tobytes()).hexdigest()  # noqa: E731
        self.hooks = [feat.unet.conv_in.register_forward_hook(lambda m, a, o: self.unet.append(a[0].shape[0])),
                      feat.vae.encoder.register_forward_hook(lambda m, a, o: self.vae_calls.append([digest(x) for x in a[0]]))]
        if dino is not None:
            self.hooks.append(dino.model.embeddings.register_forward_hook(lambda m, a, o: self.dino_calls.append([digest(x) for x in a[0]])))

    @staticmethod
    def once(calls: list[list[str]]) -> list[str]:
        """The pictures of ``calls``, each listed once per call it went through (a call's
        padding, copies of one of its pictures, not counted again)."""
        return [h for c in calls for h in dict.fromkeys(c)]

    @property
    def vae(self) -> list[str]:
        return self.once(self.vae_calls)

    @property
    def dino(self) -> list[str]:
        return self.once(self.dino_calls)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
