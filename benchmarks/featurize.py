"""Featurizer speed, memory and FLOPs: early exit (ours) vs the naive full UNet forward.

Random weights (speed does not depend on their values) in the real architectures:
the SD 2.1 UNet and VAE configs are written out below, so nothing is downloaded.

    python benchmarks/featurize.py --size tiny                     # seconds, CPU
    python benchmarks/featurize.py --size sd21 --resolution 384    # full SD 2.1 architecture on CPU
    python benchmarks/featurize.py --size sd21 --device cuda --dtypes fp32,bf16,fp16 --ensembles 1,8

Prints one markdown table: images/s and peak memory for (a) ours: VAE encode, noise,
UNet up to up_blocks[1] (early exit), in the given autocast dtype; (b) naive: the same
inputs through the full UNet in fp32 with a forward hook reading up_blocks[1], as the
official implementation does; and their ratio. Then the FLOPs of one early-exit UNet
forward vs one full forward (torch.utils.flop_counter), so the share skipped is measured.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

# diffusers configs of Stable Diffusion 2.1 (768-v): unet/config.json and vae/config.json
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=768, scaling_factor=0.18215,
)
DTYPES = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


def build(size: str, tmp: str):
    """An SDFeaturizer with random weights of the chosen size (text encoder: tiny, unused)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sd4match.features.sd import SDFeaturizer
    from sd4match.testing import tiny_sd_components

    t_unet, t_vae, text, tok, sched = tiny_sd_components(style="sd2", tokenizer_dir=tmp)
    if size == "tiny":
        return SDFeaturizer(t_unet, t_vae, text, tok, sched, model_id="tiny-sd2")
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)
    # the prompt embeddings come in from outside at 1024-d; the tiny text encoder is never called
    return SDFeaturizer(unet, vae, text, tok, sched, model_id="sd21-architecture-random")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_mb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (Linux: KiB)


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def naive(feat, x, cond, gen):
    """Official-style: the full UNet forward, the feature read by a hook on up_blocks[k]."""
    seen = []
    h = feat.unet.up_blocks[feat.config.up_block].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            noisy, t = feat.noisy_latents(*feat.posterior(feat.preprocess(x)), gen)
            c = cond.expand(x.shape[0], -1, -1).repeat_interleave(feat.config.ensemble, 0).to(feat.unet.dtype)
            for i in range(0, noisy.shape[0], feat.config.max_batch):
                sl = slice(i, i + feat.config.max_batch)
                feat.unet(noisy[sl].to(feat.unet.dtype), t[sl], encoder_hidden_states=c[sl])
        f = torch.cat(seen).float()
        return f.view(x.shape[0], feat.config.ensemble, *f.shape[1:]).mean(1)
    finally:
        h.remove()


def timed(fn, dev, reps: int = 3, warmup: int = 1) -> tuple[float, float]:
    """(seconds per call, peak MB) over ``reps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(dev)
    reset_peak(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps, peak_mb(dev)


def flops(fn) -> int:
    """FLOPs of ``fn()`` (``torch.utils.flop_counter``: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def sd_flops(unet, vae, res: int, *, latent_factor: int, prompt_dim: int, timestep: int, up_block: int) -> tuple[int, int, int]:
    """FLOPs of one early-exit UNet forward (to ``up_blocks[up_block]``), one full forward and
    one VAE encode, batch 1 at ``res``; give modules on the meta device (nothing computes)."""
    from sd4match.features.sd import unet_up_to

    side = res // latent_factor
    with torch.device("meta"):
        noisy = torch.randn(1, 4, side, side)
        t = torch.tensor([timestep])
        cond = torch.randn(1, 77, prompt_dim)
        image = torch.rand(1, 3, res, res)
    with torch.no_grad():
        early = flops(lambda: unet_up_to(unet, noisy, t, cond, up_block))
        full = flops(lambda: unet(noisy, t, encoder_hidden_states=cond))
        enc = flops(lambda: vae.encode(2 * image - 1))
    return early, full, enc


def count_flops(size: str, res: int, tmp: str) -> tuple[int, int, int]:
    """FLOPs of one early-exit UNet forward, one full forward and one VAE encode (batch 1).

    Counted on modules built on the meta device: no arithmetic runs, so full-size numbers at
    768 cost about a second on any machine.
    """
    with torch.device("meta"):
        feat = build(size, tmp)
    return sd_flops(feat.unet, feat.vae, res, latent_factor=feat.latent_factor, prompt_dim=feat.prompt_dim, timestep=feat.config.timestep,
                    up_block=feat.config.up_block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=None, help="default: 768 (sd21), 128 (tiny)")
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--ensembles", default="1")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the early-exit UNet and the VAE encoder for the ours rows")
    ap.add_argument("--flops-only", action="store_true", help="skip the timings")
    ap.add_argument("--flops-resolution", type=int, default=None, help="resolution of the FLOP count (default: --resolution)")
    args = ap.parse_args()
    import tempfile

    dev = torch.device(args.device)
    res = args.resolution or (768 if args.size == "sd21" else 128)
    with tempfile.TemporaryDirectory() as tmp:
        feat = build(args.size, tmp).to(dev)
    feat.reconfigure(resolution=res, max_batch=args.max_batch)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"# featurize benchmark: {args.size} architecture, {res}x{res}, batch {args.batch}, device {dev} ({gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    x = torch.rand(args.batch, 3, res, res, device=dev)
    cond = torch.randn(1, 77, feat.prompt_dim, device=dev)
    if args.compile:
        feat.reconfigure(compile=True)
    rows = []
    for ens in [] if args.flops_only else [int(e) for e in args.ensembles.split(",")]:
        feat.reconfigure(ensemble=ens)
        base = None
        if not args.no_naive:
            gen = torch.Generator(device=dev).manual_seed(0)
            base = timed(lambda: naive(feat, x, cond, gen), dev, args.reps, args.warmup)
            rows.append(("naive full UNet, fp32", ens, base[0], base[1], None))
        for name in args.dtypes.split(","):
            feat.reconfigure(amp_dtype=DTYPES[name])
            gen = torch.Generator(device=dev).manual_seed(0)

            def ours():
                with torch.no_grad():
                    feat(x, prompt_embeds=cond, generator=gen)

            sec, mb = timed(ours, dev, args.reps, args.warmup)
            rows.append((f"ours early exit, {name}", ens, sec, mb, base[0] / sec if base else None))
        feat.reconfigure(amp_dtype=None)
    if rows:
        print()
        print("| method | ensemble | s / call | images/s | peak MB | speed-up vs naive |")
        print("|---|---|---|---|---|---|")
    for name, ens, sec, mb, ratio in rows:
        print(f"| {name} | {ens} | {sec:.3f} | {args.batch / sec:.2f} | {mb:.0f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    if rows and dev.type == "cpu":
        print("\n(peak MB on CPU: the process's resident high-water mark so far, not per row)")
    flops_res = args.flops_resolution or res
    with tempfile.TemporaryDirectory() as tmp:
        early, full, vae = count_flops(args.size, flops_res, tmp)
    print(f"\nFLOPs at {flops_res}x{flops_res}: UNet per noisy copy: early exit {early / 1e9:.3f} GFLOP, full {full / 1e9:.3f} GFLOP "
          f"(early exit skips {100 * (1 - early / full):.1f}%); VAE encode per image {vae / 1e9:.3f} GFLOP")
    for e in [int(v) for v in args.ensembles.split(",")]:
        print(f"  ensemble {e}: per image, ours {(vae + e * early) / 1e9:.1f} GFLOP vs full {(vae + e * full) / 1e9:.1f} GFLOP"
              f" ({(vae + e * full) / (vae + e * early):.2f}x fewer)")


if __name__ == "__main__":
    main()
