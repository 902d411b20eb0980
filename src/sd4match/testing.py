"""Tiny random models built from config, for our tests and for users' CI.

They are saved in exactly the layouts the real weights come in (a diffusers pipeline
folder; a transformers model folder), so loading them exercises the same code path as
loading Stable Diffusion 2.1 or DINOv2. No network is touched: the CLIP tokenizer is
built from a byte-level vocabulary (every byte, alone and word-final, plus BOS/EOS) with
no merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

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

    from diffusers import StableDiffusionPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, text_encoder, tokenizer, scheduler = tiny_sd_components(seed=seed, style=style, tokenizer_dir=tmp)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_dinov2(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random transformers ``Dinov2Model`` (patch 14, 224 input); return ``path``."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=14, image_size=224)
    )
    model.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)
