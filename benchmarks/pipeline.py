"""End-to-end speed of sd4match's pipelines, stage by stage, with the official-like baseline.

Random weights in the real architectures (speed does not depend on weight values): the
SD 2.1 UNet and VAE, the CLIP ViT-H text encoder and DINOv2-B, built from their configs,
so nothing is downloaded. The data are generated pictures (500 x 375 JPEGs) in the
PF-Willow layout for evaluation and a picture folder for synthetic training pairs: the
same loaders, store, batching and matching as a real run.

    python benchmarks/pipeline.py --size tiny                       # CPU, about 40 s on 2 cores
    python benchmarks/pipeline.py --size sd21 --device cuda         # the GPU table (RESULTS.md)
    python benchmarks/pipeline.py --size sd21 --device cuda --compile

Prints markdown tables: per-stage times (load + resize, VAE, UNet, DINOv2, matching);
featurizing a new image (ensemble 8, batch 1 and 4) against the official way (fp16
weights, the full UNet forward read by a hook, batch 1); evaluate s/pair with an empty
and a CPM prompt, with each model's calls and padding; train s/step (single and CPM,
micro-batch 3 and 9); peak memory; the levers asked for with ``--levers`` (each one's
featurize or evaluate row beside the plain one); then the floor: the FLOPs of each
measured unit of work (counted with ``torch.utils.flop_counter`` on meta-device copies),
divided by the device's peak (its named bf16 dense peak where known, and the measured
peak of a large matmul), and the ratio of each measured row to its floor; and the
projected SPair-71k test time with CPM (12,234 pairs) and a 30k-step training run.

    python benchmarks/pipeline.py --size sd21 --device cuda --compile \
        --levers sdpa:flash,sdpa:efficient,sdpa:cudnn,channels-last,cudnn-benchmark,cpm-pairs:4,vae-batch:8,compile:reduce-overhead,compile:max-autotune

The kernel levers (``sdpa``, ``channels-last``, ``cudnn-benchmark``, ``compile``) go through the
featurizer's own settings, so a lever's row is what ``--attention``, ``--channels-last``,
``--cudnn-benchmark`` or ``--compile`` give a real run; ``<lever>@train`` measures one on the
CPM training step. The plain rows run with the settings a run gets by default on the device.

``--profile N`` adds where the time of a CPM evaluation of N pairs goes (torch.profiler:
the GPU's kernels on CUDA, the CPU's operators otherwise), in shares of convolution,
attention, GroupNorm, matmul, layout copies, elementwise work and the rest, with the top
kernels by name; ``--profile-train N`` the same for N CPM training steps (batch 9), with the
share of the kernels run in the backward pass and in the optimiser's step. ``--budget-s S``
starts no further part or lever once S seconds have passed (each is reported as not
measured); the floor and the tables are printed all the same, and ``--json`` is rewritten
after every row, so a run stopped from outside keeps what it measured. With ``--compile``,
each compiled row (and lever) compiles anew (``torch.compiler.reset()``), as a new process
of the command it stands for would, and its compilation time is printed beside it.
``benchmarks/gpu.sh`` is the prepared GPU run in parts; ``benchmarks/gpu_table.py`` makes
the RESULTS.md tables from their JSONs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from featurize import SD21_UNET, SD21_VAE, flops, peak_mb, reset_peak, sd_flops, sync, timed  # noqa: E402
from gpu_table import percentages, waiting  # noqa: E402

# CLIP ViT-H/14 text tower (SD 2.1's text_encoder/config.json) and DINOv2-B/14
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=512, eos_token_id=513)
DINOV2_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=14, image_size=518,
                layerscale_value=1.0)


def build(size: str, dev: torch.device, dtype: torch.dtype, tmp: Path):
    """(SDFeaturizer, DinoFeaturizer) with random weights, on ``dev`` in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    from sd4match.features import DinoFeaturizer, SDFeaturizer
    from sd4match.testing import tiny_dinov2, tiny_sd_components

    t_unet, t_vae, t_text, tok, sched = tiny_sd_components(style="sd2", tokenizer_dir=tmp / "tok")
    if size == "tiny":
        feat = SDFeaturizer(t_unet, t_vae, t_text, tok, sched, model_id="tiny-sd2")
        dino = DinoFeaturizer.from_pretrained(tiny_dinov2(tmp / "dino"))
    else:
        torch.manual_seed(0)
        with torch.device(dev):  # initialise on the device: minutes faster than on the CPU
            unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)
            text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
            dnet = Dinov2Model(Dinov2Config(**DINOV2_B))
        feat = SDFeaturizer(unet, vae, text, tok, sched, model_id="sd21-architecture-random")
        dino = DinoFeaturizer(dnet, model_id="dinov2-b-architecture-random")
    return feat.to(dev, dtype), dino.to(dev, dtype)


def make_pictures(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` smooth random 500 x 375 JPEGs (image-like statistics, decode cost of a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        noise = rng.integers(-20, 20, (375, 500, 3))
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        p = folder / f"img{i:03d}.jpg"
        im.save(p, quality=90)
        out.append(p)
    return out


def willow_like(root: Path, n_images: int, n_pairs: int) -> Path:
    """A PF-Willow-layout dataset over generated pictures: ``n_pairs`` ordered pairs, 10 keypoints each."""
    pics = make_pictures(root / "PF-dataset" / "thing(A)", n_images)
    rng = np.random.default_rng(1)
    cols = ["imageA", "imageB"] + [f"{a}{i}" for a in ("XA", "YA", "XB", "YB") for i in range(1, 11)]
    rows = [",".join(cols)]
    pairs = [(a, b) for a in range(n_images) for b in range(n_images) if a != b]
    for k in range(n_pairs):
        a, b = pairs[(k * 7) % len(pairs)]
        xy = [f"{v:.2f}" for v in np.concatenate([rng.uniform(20, 480, 10), rng.uniform(20, 355, 10), rng.uniform(20, 480, 10), rng.uniform(20, 355, 10)])]
        rows.append(",".join([pics[a].relative_to(root).as_posix(), pics[b].relative_to(root).as_posix(), *xy]))
    (root / "test_pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def official_like(feat, x, cond, dev):
    """The official code's way: fp16 weights, the whole UNet forward, features read by a hook, one image a call."""
    seen = []
    h = feat.unet.up_blocks[feat.config.up_block].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            dist = feat.vae.encode((2 * x - 1).to(feat.vae.dtype)).latent_dist
            z = (dist.sample() * feat.vae.config.scaling_factor).repeat_interleave(feat.config.ensemble, 0)
            t = torch.full((z.shape[0],), feat.config.timestep, device=dev)
            noisy = feat.scheduler.add_noise(z, torch.randn_like(z), t)
            feat.unet(noisy, t, encoder_hidden_states=cond.expand(z.shape[0], -1, -1).to(feat.unet.dtype))
        return seen[0].float().view(x.shape[0], feat.config.ensemble, *seen[0].shape[1:]).mean(1)
    finally:
        h.remove()


#: dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by a
#: substring of ``torch.cuda.get_device_name``
NAMED_PEAKS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
               "RTX 4090": 165.0, "RTX 6000 Ada": 365.0, "B200": 2250.0, "GB200": 2500.0}


def named_peak(name: str) -> float | None:
    """The data sheet's dense bf16 peak in TFLOP/s of a device name, or None."""
    hits = [k for k in NAMED_PEAKS if k in name]
    return NAMED_PEAKS[max(hits, key=len)] if hits else None


def matmul_peak(dev: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul in ``dtype`` on ``dev`` (the reachable peak)."""
    n = 8192 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    sec, _ = timed(lambda: a @ b, dev, reps=10 if dev.type == "cuda" else 3)
    return 2 * n**3 / sec / 1e12


def count_work_flops(feat, dino, res: int) -> dict[str, float]:
    """FLOPs of each unit of work at ``res`` (one sample, picture or step), counted on
    meta-device copies of the modules (no arithmetic runs): UNet to ``up_blocks[1]`` (ours)
    and the full UNet (the official way), forward; the same early exit forward and backward
    to the prompt (training); the VAE encoder; DINOv2 at the CPM's 224 crop."""
    import copy

    from sd4match.features.sd import unet_up_to

    def on_meta(m):
        return copy.deepcopy(m).to("meta").float()

    unet, vae, dnet = on_meta(feat.unet), on_meta(feat.vae), on_meta(dino.model)
    k = feat.config.up_block
    early, full, enc = sd_flops(unet, vae, res, latent_factor=feat.latent_factor, prompt_dim=feat.prompt_dim, timestep=261, up_block=k)
    side = res // feat.latent_factor
    with torch.device("meta"):
        noisy, t = torch.randn(1, 4, side, side), torch.tensor([261])
        cond = torch.randn(1, 77, feat.prompt_dim, requires_grad=True)
        crop = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        dino_flops = flops(lambda: dnet(pixel_values=crop))
    train = flops(lambda: unet_up_to(unet, noisy, t, cond, k).float().mean().backward())
    return {"unet_sample": float(early), "unet_full_sample": float(full), "vae_picture": float(enc), "dino_picture": float(dino_flops),
            "unet_train_sample": float(train)}


#: kernel and operator names by what they do: the first category with a matching substring
#: (of the lower-cased name) wins, so the implicit GEMMs of cuDNN count as convolution
PROFILE_CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash", "fmha", "attention", "sdpa")),
    ("GroupNorm", ("group_norm", "groupnorm", "rowwisemoments", "computefusedparams", "backwardfusedparams", "computeinternalgradients")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("layout copies", ("nchwtonhwc", "nhwctonchw", "transpose", "permute", "copy", "contiguous", "cat_", "aten::cat")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd", "im2col")),
    ("matmul", ("gemm", "addmm", "aten::mm", "_mm", "bmm", "matmul", "linear", "cutlass", "xmma", "cublas", "nvjet")),
    ("elementwise", ("elementwise", "aten::add", "aten::mul", "aten::sub", "aten::div", "silu", "gelu", "aten::where", "reduce")),
)


def profile_category(name: str) -> str:
    """What a profiled kernel or operator does, from its name (PROFILE_CATEGORIES), else "other".
    The kernels torch.compile writes (``triton_poi_fused_...``, ``triton_red_fused_...``) fuse
    several operators and count as "Triton fusions" (the top list names them); its tuned
    templates (``triton_tem_fused_mm_...``) count as what they compute."""
    low = name.lower()
    if low.startswith("triton_") and not low.startswith("triton_tem"):
        return "Triton fusions"
    return next((cat for cat, keys in PROFILE_CATEGORIES if any(k in low for k in keys)), "other")


#: the ranges the autograd engine (one per backward node) and torch.optim (one per step) open
#: in a profile: the kernels launched inside them are a training step's backward and optimiser
PROFILE_PHASES = (("backward", "autograd::engine::evaluate_function:"), ("optimiser", "Optimizer.step#"))


def profile_shares(fn, dev: torch.device, top: int = 12) -> dict:
    """Run ``fn`` under torch.profiler: the self time of every GPU kernel (CUDA) or CPU operator
    (otherwise), in total, by category and for the ``top`` names; and by phase (PROFILE_PHASES):
    the time of the kernels or operators run inside the autograd engine's backward nodes and
    inside optimiser steps, the rest being the forward (and whatever else ``fn`` does)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        fn()
        sync(dev)
    times, inside = {}, dict.fromkeys((name for name, _ in PROFILE_PHASES), 0.0)
    for e in prof.key_averages():
        for phase, prefix in PROFILE_PHASES:  # a range's total: what ran inside it (on CUDA: its kernels' time)
            if e.key.startswith(prefix) and e.device_type == DeviceType.CPU:
                inside[phase] += e.device_time_total if gpu else e.cpu_time_total
        if gpu and e.device_type != DeviceType.CUDA:
            continue
        t = e.self_device_time_total if gpu else e.self_cpu_time_total
        if t > 0:
            times[e.key] = times.get(e.key, 0.0) + t
    total = sum(times.values()) or 1.0
    phases = {k: min(1.0, v / total) for k, v in inside.items()}
    phases = {"forward and the rest": max(0.0, 1.0 - sum(phases.values())), **phases}
    cat = {k: profile_category(k) for k in times}
    shares: dict[str, float] = {}
    for k, t in times.items():
        shares[cat[k]] = shares.get(cat[k], 0.0) + t / total
    names = sorted(times, key=times.get, reverse=True)[:top]
    out = {"what": "GPU kernels" if gpu else "CPU operators", "total_ms": total / 1000, "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
           "top": [{"name": k, "share": times[k] / total, "category": cat[k]} for k in names], "phases": phases}
    if gpu:  # how much of the wall time the GPU computes: the rest it waits for the CPU (launches, Python, syncs)
        s = time.perf_counter()
        fn()  # again, without the profiler's own overhead on the CPU side
        sync(dev)
        out["wall_ms"] = 1000 * (time.perf_counter() - s)
        out["busy"] = min(1.0, out["total_ms"] / out["wall_ms"])
    return out


def print_top(prof: dict) -> None:
    """The ``top`` list of a ``profile_shares`` result as a markdown table."""
    print("| kernel or operator | share | counted as |\n|---|---|---|")
    for t in prof["top"]:
        print(f"| {t['name'][:90]} | {100 * t['share']:.1f} % | {t['category']} |")


def count_syncs(fn, dev) -> int | None:
    """How many times ``fn()`` made the CPU wait for the GPU (CUDA's synchronising calls, as
    ``torch.cuda.set_sync_debug_mode`` reports them); None off CUDA or where torch cannot say."""
    if dev.type != "cuda":
        return None
    import warnings

    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)
    except Exception:  # noqa: BLE001 - a diagnostic: never the reason a GPU run fails
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the early-exit UNet and the VAE encoder")
    ap.add_argument("--resolution", type=int, default=None, help="working size (default: 768 sd21, 64 tiny; a smaller one checks the sd21 run on a CPU)")
    ap.add_argument("--eval-pairs", type=int, default=None, help="pairs per evaluate measurement (default: 64 sd21, 24 tiny)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps per training row (after one warm-up step)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: stages,featurize,evaluate,sweep,train")
    ap.add_argument("--featurize-batches", default="1,4", help="batch sizes of the featurize rows (comma-separated; 4 is the one the floor and the levers compare)")
    ap.add_argument("--train-micro", default="3,9", help="micro-batch sizes of the training rows (comma-separated)")
    ap.add_argument("--levers", default="", help="comma-separated levers, each measured beside the plain row: sdpa:<flash|efficient|cudnn|math>, "
                    "channels-last[:off], cudnn-benchmark[:off], cpm-pairs:<pairs a UNet call>, vae-batch:<pictures a VAE call>, "
                    "compile:<default|reduce-overhead|max-autotune>; a kernel lever (sdpa, channels-last, cudnn-benchmark, compile) with @train "
                    "is measured on the CPM training step (batch 9, the largest --train-micro) instead of featurizing")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile a CPM evaluation of N pairs: where its time goes")
    ap.add_argument("--profile-train", type=int, default=0, metavar="N", help="also profile N CPM training steps (batch 9, the largest --train-micro): "
                    "where their time goes, by kernel and by phase (forward, backward, optimiser)")
    ap.add_argument("--budget-s", type=float, default=0, help="start no part or lever after this many seconds (0: no budget)")
    ap.add_argument("--json", type=Path, help="also write every number here (rewritten after every row)")
    args = ap.parse_args()

    from sd4match.batching import Batcher, Picture
    from sd4match.config import ModelConfig, kernel_choice
    from sd4match.errors import Sd4MatchError
    from sd4match.data import open_dataset
    from sd4match.evaluate import predict_pairs, resolve_prompt
    from sd4match.matching import match_pixels
    from sd4match.prompts import make_prompt
    from sd4match.runtime import pick_dtype
    from sd4match.store import Store
    from sd4match.train import Trainer, TrainConfig

    dev = torch.device(args.device)
    dtype = pick_dtype(args.dtype, dev)
    skip = set(filter(None, args.skip.split(",")))
    sd21 = args.size == "sd21"
    res = args.resolution or (768 if sd21 else 64)
    results: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="sd4match-bench-"))
    t0 = time.perf_counter()
    feat, dino = build(args.size, dev, dtype, tmp)
    # the kernel settings a run of sd4match gets by default on this device (--channels-last / --attention / --cudnn-benchmark auto)
    kernels = kernel_choice(ModelConfig(), dev.type)
    feat.reconfigure(resolution=res, ensemble=8, max_batch=32, compile=args.compile, **kernels)
    plain = {k: getattr(feat.config, k) for k in ("compile", "compile_mode", *kernels)}  # what every row after a lever's goes back to
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# pipeline benchmark: {args.size} architecture (random weights), {res} px, {dev} ({name}), weights {dtype}, "
          f"compile {args.compile}, kernels {kernels}, torch {torch.__version__}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    results["setup"] = {"size": args.size, "device": str(dev), "device_name": name, "dtype": str(dtype), "compile": args.compile, "kernels": kernels,
                        "torch": torch.__version__}
    rows: list[tuple[str, str, float | None]] = []

    def save():
        if args.json:  # whole after every row: a run stopped from outside keeps what it measured
            from sd4match.fileio import atomic_write_text

            atomic_write_text(args.json, json.dumps(results, indent=1, default=str))

    def row(what, value, unit, mb=None):
        rows.append((what, f"{value:.2f} {unit}", mb))
        results[what] = {"value": value, "unit": unit, "peak_mb": mb}
        print(f"  {what}: {value:.2f} {unit}" + (f" (peak {mb:.0f} MB)" if mb is not None else ""), flush=True)
        save()

    def runs(part: str) -> bool:
        """Whether ``part`` is to run: not skipped, and started inside ``--budget-s``."""
        if part in skip:
            return False
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            print(f"  {part}: not measured (the time budget of {args.budget_s:g} s was spent)", flush=True)
            results[f"not measured: {part}"] = "time budget"
            save()
            return False
        return True

    pics = make_pictures(tmp / "pics", 16)
    cond = torch.randn(1, 77, feat.prompt_dim, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x4 = torch.rand(4, 3, res, res, device=dev)

    def fresh_compile() -> None:
        """Forget what torch.compile compiled, so that the next row compiles for its own shapes
        as a new process of the command it measures does, and its first call's time is its
        own compilation. (The featurizer compiles for static shapes, ``dynamic=False``; before
        that, a shape met before made torch.compile's graph dynamic on the recompile.)"""
        if feat.config.compile:
            torch.compiler.reset()

    def featurize_ms(b: int) -> tuple[float, float, float]:
        """(ms per image, peak MB, seconds of the first call) of featurizing ``b`` new images, ensemble 8."""
        fresh_compile()
        with torch.no_grad():
            t_c = time.perf_counter()
            feat(x4[:b], prompt_embeds=cond, generator=g)  # compiles on the first call when compiling
            sync(dev)
            first = time.perf_counter() - t_c
            sec, mb = timed(lambda: feat(x4[:b], prompt_embeds=cond, generator=g), dev)
        return 1000 * sec / b, mb, first

    n_pairs = args.eval_pairs or (64 if sd21 else 24)
    eval_root = willow_like(tmp / "willow", 12, n_pairs)
    eval_recs = open_dataset("pfwillow", eval_root).pairs("test")
    eval_img = len({p for r in eval_recs for p in (r.src, r.trg)})
    workers = 8 if dev.type == "cuda" else 2
    cpm = make_prompt("cpm", feat, dino_dim=dino.feature_dim).to(dev)

    def evaluate_s(prompt) -> tuple[float, float, dict, tuple[float, int]]:
        """(seconds for the evaluation pairs, peak MB, each model's calls and padding, (seconds,
        pairs) of the warm-up) with ``prompt``, after a warm-up (where compiling: its compilation)."""
        fresh_compile()
        warm = eval_recs[: 2 * Batcher(feat).pairs_per_call()]
        s = time.perf_counter()
        list(predict_pairs(feat, prompt, warm, str(eval_root), workers=workers, dino=dino, store=Store(), progress=False))  # warm-up (and compile)
        sync(dev)
        first = time.perf_counter() - s
        reset_peak(dev)
        batcher = Batcher(feat, dino=dino, store=Store())
        s = time.perf_counter()
        out = list(predict_pairs(feat, prompt, eval_recs, str(eval_root), workers=workers, batcher=batcher, progress=False))
        sync(dev)
        sec = time.perf_counter() - s
        assert all(not isinstance(k, BaseException) for _, k in out)
        return sec, peak_mb(dev), batcher.work_counts(), (first, len(warm))
    if runs("stages"):
        from PIL import Image

        n = len(pics)
        s = time.perf_counter()
        for p in pics:
            Picture(Image.open(p).convert("RGB")).prepare(res)
        row("load + resize (one CPU thread), per image", 1000 * (time.perf_counter() - s) / n, "ms")
        for b in (1, 4):
            sec, mb = timed(lambda: feat.posterior(x4[:b]), dev)
            row(f"VAE posterior, batch {b}, per image", 1000 * sec / b, "ms", mb)
        side = res // 8
        for n_s in (8, 32):
            noisy, t = torch.randn(n_s, 4, side, side, device=dev), torch.full((n_s,), 261, device=dev)
            c = cond.expand(n_s, -1, -1)
            with torch.no_grad():
                sec, mb = timed(lambda: feat.unet_features(noisy, t, c), dev)
            row(f"UNet to up_blocks[1], {n_s} samples a call, per sample", 1000 * sec / n_s, "ms", mb)
        ims = [Image.open(p).convert("RGB") for p in pics]
        for b in (1, 16):
            sec, mb = timed(lambda: dino.tokens(ims[:b]), dev)
            row(f"DINOv2 tokens, batch {b}, per image (incl. its PIL preprocessing)", 1000 * sec / b, "ms", mb)
        with torch.no_grad():
            maps = feat(x4[:2], prompt_embeds=cond, generator=g)
        kps = np.random.default_rng(0).uniform(10, 490, (20, 2))
        sec, _ = timed(lambda: match_pixels(feat, maps[0], maps[1], kps, (500, 375), (500, 375), "kernel-softargmax"), dev, reps=10)
        row("matching, kernel soft-argmax, 20 points, per pair", 1000 * sec, "ms")

    if runs("featurize"):
        for b in (int(v) for v in args.featurize_batches.split(",")):
            ms, mb, first = featurize_ms(b)
            row(f"featurize new image, ensemble 8, batch {b}, per image (ours)", ms, "ms", mb)
            results[f"featurize_b{b}_ms"] = ms
            if args.compile:
                row(f"  first call incl. compilation, batch {b}", first, "s")
        from sd4match.features.dino import DinoConfig, DinoFeaturizer
        from sd4match.features.fused import FusedFeaturizer

        fused = FusedFeaturizer(feat, dino.model, dino_id=dino.model_id)
        with torch.no_grad():
            sec, mb = timed(lambda: fused(x4, prompt_embeds=cond, generator=g), dev)
        row("featurize new image, SD + DINOv2 fused, ensemble 8, batch 4, per image", 1000 * sec / 4, "ms", mb)
        alone = DinoFeaturizer(dino.model, DinoConfig(mode="squash", resolution=14 * round(60 * res / 768) if sd21 else 112), model_id=dino.model_id)
        with torch.no_grad():
            sec, mb = timed(lambda: alone(x4), dev)
        row(f"featurize new image, DINOv2 alone at {alone.resolution} ({alone.grid_size[0]} x {alone.grid_size[1]}), batch 4, per image",
            1000 * sec / 4, "ms", mb)
        if dev.type == "cuda":  # the official code's way, on fp16 copies of the same modules
            import copy

            off = copy.copy(feat)
            off.unet, off.vae = copy.deepcopy(feat.unet).half(), copy.deepcopy(feat.vae).half()
            sec, mb = timed(lambda: official_like(off, x4[:1], cond, dev), dev)
            row("featurize new image, ensemble 8, batch 1, official-like (fp16, full UNet + hook)", 1000 * sec, "ms", mb)
            results["official_ms"] = 1000 * sec
            del off
            torch.cuda.empty_cache()

    if runs("evaluate"):
        for label, prompt, extractions in (("empty", resolve_prompt("empty", feat), eval_img), ("CPM", cpm, 2 * len(eval_recs))):
            sec, mb, work, (first, n_warm) = evaluate_s(prompt)
            row(f"evaluate, {label} prompt, ensemble 8, per pair ({len(eval_recs)} pairs, {eval_img} images)", sec / len(eval_recs), "s", mb)
            row(f"evaluate, {label} prompt, per feature extraction ({extractions})", 1000 * sec / extractions, "ms")
            print("    model calls: " + "; ".join(f"{m}: {w['calls']} calls, {w['items']} {'samples' if m == 'unet' else 'pictures'}, "
                                                f"{w['padded']} padding" for m, w in work.items()), flush=True)
            results[f"evaluate_{label}_s_per_pair"] = sec / len(eval_recs)
            results[f"evaluate_{label}_ms_per_extraction"] = 1000 * sec / extractions
            results[f"evaluate_{label}_work"] = work
            if args.compile:
                row(f"  evaluate, {label} prompt: warm-up ({n_warm} pairs) incl. compilation", first, "s")

    if runs("sweep"):  # a sweep's cost: the layers of one timestep from one UNet pass, matching per layer
        from sd4match.config import EvalConfig
        from sd4match.evaluate import evaluate_layers

        n_pairs = args.eval_pairs or (64 if sd21 else 24)
        root = willow_like(tmp / "willow-sweep", 12, n_pairs)
        recs = open_dataset("pfwillow", root).pairs("test")
        n_img = len({p for r in recs for p in (r.src, r.trg)})
        feat.reconfigure(ensemble=8)
        cfg = EvalConfig("pfwillow", str(root), prompt="empty", rule="nn", workers=8 if dev.type == "cuda" else 2)
        layers = (0, 1, 2)
        evaluate_layers(feat, cfg, {k: tmp / f"sweep-warm-{k}" for k in layers}, records=recs[:4], store=Store(), progress=False)  # warm-up
        sync(dev)
        s = time.perf_counter()
        evaluate_layers(feat, cfg, {k: tmp / f"sweep-{k}" for k in layers}, records=recs, store=Store(), progress=False)
        sync(dev)
        sec = time.perf_counter() - s
        per_img = sec / n_img
        row(f"sweep, empty prompt, ensemble 8, {len(layers)} layers from one pass, per image", 1000 * per_img, "ms")
        row(f"sweep cells per minute on a split of 1,000 pictures ({len(layers)} layers a pass)", 60 / (per_img * 1000 / len(layers)), "cells/min")

    train_pics = tmp / "train-pics"

    def steady_trainer(kind: str, micro: int, **over):
        """(Trainer, seconds of its first step) of ``kind`` at batch 9 and ``micro``, in the steady
        state: its first step taken (where compiling: compiled) and every training picture's VAE
        posterior (and DINOv2 tokens) stored, as after the first epoch; ``over``: other
        ``TrainConfig`` settings (a lever's). The caller closes it."""
        if not train_pics.exists():
            make_pictures(train_pics, 24, seed=3)
        # compiled as the run is (TrainConfig's own default, auto, would compile on CUDA: the rows would not say eager)
        cfg = TrainConfig(dataset="synthetic", root=str(train_pics), prompt=kind, model="-", resolution=res, steps=10**6, batch_size=9,
                          micro_batch=micro, val_every=0, device=str(dev), workers=8 if dev.type == "cuda" else 2,
                          **{"compile": "on" if args.compile else "off", **over})
        feat.reconfigure(ensemble=1)
        fresh_compile()
        t_c = time.perf_counter()
        tr = Trainer(cfg, tempfile.mkdtemp(dir=tmp, prefix=f"run-{kind}-{micro}-"), featurizer=feat, dino=dino if kind == "cpm" else None, progress=False)
        tr.train_step()  # warm-up: the first pictures' posteriors and tokens, compilation
        sync(dev)
        first = time.perf_counter() - t_c
        every = [p for r in tr.train_pairs for p in tr.batcher.load_pair(cfg.root, r)]
        tr.batcher.posteriors(every)  # in whole calls (each picture once)
        if kind == "cpm":
            tr.batcher.tokens(every)
        sync(dev)
        return tr, first

    def close_trainer(tr) -> None:
        # its loader threads decode ahead: stopped, or they would compete with the rows after this one
        tr.close_loader()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        feat.reconfigure(ensemble=8, **plain)  # a lever's trainer set its own kernel and compile settings on the featurizer

    def train_step_s(kind: str, micro: int, **over) -> tuple[float, float, float]:
        """(seconds a step, peak MB, seconds of the first step) of ``steady_trainer(kind, micro, **over)``
        over ``--train-steps`` steps; the trainer is closed after."""
        tr, first = steady_trainer(kind, micro, **over)
        try:
            reset_peak(dev)
            s = time.perf_counter()
            for _ in range(args.train_steps):
                tr.train_step()
            sync(dev)
            return (time.perf_counter() - s) / args.train_steps, peak_mb(dev), first
        finally:
            close_trainer(tr)

    if runs("train"):
        for kind in ("single", "cpm"):
            for micro in (int(m) for m in args.train_micro.split(",")):
                sec, mb, first = train_step_s(kind, micro)
                row(f"train step, {kind}, batch 9, micro-batch {micro} (posteriors stored)", sec, "s", mb)
                results[f"train_{kind}_{micro}_s_per_step"] = sec
                if args.compile:
                    row(f"  train step, {kind}, micro-batch {micro}: first step incl. compilation", first, "s")

    def lever_settings(kind: str, arg: str) -> tuple[dict, dict] | None:
        """A kernel lever's (featurizer settings, as ``sd4match`` applies them; the same as
        ``TrainConfig`` flags, as ``sd4match train`` takes them), or None for another lever."""
        if kind == "sdpa":
            return {"attention": arg}, {"attention": arg}
        if kind in ("channels-last", "cudnn-benchmark"):
            if arg not in ("", "on", "off"):
                raise ValueError(f"lever {kind}:{arg}: expected {kind}, {kind}:on or {kind}:off")
            name = kind.replace("-", "_")
            return {name: arg != "off"}, {name: arg or "on"}
        if kind == "compile":
            mode = arg or "default"
            return {"compile": True, "compile_mode": mode}, {"compile": "on" if mode == "default" else mode}
        return None

    for lever in filter(None, args.levers.split(",")):
        spec, _, target = lever.partition("@")  # <lever>@train: measured on the CPM training step instead of featurizing
        kind, _, arg = spec.partition(":")
        if not runs(f"lever {lever}"):
            continue
        label = {"sdpa": f"sdpa {arg}", "compile": f"compile {arg}"}.get(kind, spec)
        try:
            changes, flags = lever_settings(kind, arg) or (None, None)
            if target == "train":
                if flags is None:
                    raise ValueError(f"lever {lever}: only kernel levers (sdpa, channels-last, cudnn-benchmark, compile) have a training row")
                micro = max(int(m) for m in args.train_micro.split(","))
                sec, mb, first = train_step_s("cpm", micro, **flags)
                row(f"lever {label}: train step, cpm, batch 9, micro-batch {micro} (posteriors stored)", sec, "s", mb)
                if "compile" in changes:
                    row(f"  lever {label}: train, first step incl. compilation", first, "s")
            elif target:
                raise ValueError(f"lever {lever}: unknown target {target!r} (featurize by default, or @train)")
            elif changes is not None:  # kernel settings: through the featurizer's own settings, as a run with the flag gets them
                was = {k: getattr(feat.config, k) for k in changes}
                feat.reconfigure(**changes)
                try:
                    ms, mb, first = featurize_ms(4)
                finally:
                    feat.reconfigure(**was)
                compiled = " (compiled)" if feat.config.compile and kind != "compile" else ""
                row(f"lever {label}{compiled}: featurize new image, ensemble 8, batch 4, per image", ms, "ms", mb)
                if kind == "compile":
                    row(f"  lever compile {arg}: first call incl. compilation", first, "s")
            elif kind == "cpm-pairs":
                pairs = int(arg)
                feat.reconfigure(max_batch=2 * 8 * pairs)
                try:
                    sec, mb, _, _ = evaluate_s(cpm)
                finally:
                    feat.reconfigure(max_batch=32)
                row(f"lever cpm-pairs {pairs} a UNet call: evaluate, CPM prompt, per feature extraction", 1000 * sec / (2 * len(eval_recs)), "ms", mb)
            elif kind == "vae-batch":
                n = int(arg)
                xs = torch.rand(n, 3, res, res, device=dev)
                feat.reconfigure(vae_batch=n)
                try:
                    sec, mb = timed(lambda: feat.posterior(xs), dev)
                finally:
                    feat.reconfigure(vae_batch=8)
                row(f"lever vae-batch {n}: VAE posterior, per image", 1000 * sec / n, "ms", mb)
            else:
                raise ValueError(f"unknown lever {lever!r}")
        except (RuntimeError, KeyError, ValueError, Sd4MatchError) as e:  # a backend this device lacks, a bad name: said, and the others still run
            print(f"  lever {lever}: not measured ({str(e).splitlines()[0][:200]})", flush=True)
            results[f"lever {lever}"] = {"error": str(e).splitlines()[0][:200]}

    if args.profile and runs("profile"):  # where a CPM evaluation's time goes
        recs = eval_recs[: args.profile]
        fresh_compile()  # as every compiled row: the graphs of this run's own shapes
        list(predict_pairs(feat, cpm, recs[:2], str(eval_root), workers=workers, dino=dino, store=Store(), progress=False))  # warm-up
        prof = profile_shares(lambda: list(predict_pairs(feat, cpm, recs, str(eval_root), workers=workers, dino=dino, store=Store(), progress=False)), dev)
        results["profile"] = {"pairs": len(recs), **prof}
        save()
        print(f"\nWhere a CPM evaluation of {len(recs)} pairs spends its time (torch.profiler, self time of the {prof['what']}: "
              f"{prof['total_ms']:.0f} ms): " + percentages(prof["shares"]) + waiting(prof))
        print_top(prof)

    if args.profile_train and runs("profile-train"):  # where a CPM training step's time goes
        micro = max(int(m) for m in args.train_micro.split(","))
        tr, _ = steady_trainer("cpm", micro)
        try:
            prof = profile_shares(lambda: [tr.train_step() for _ in range(args.profile_train)], dev)
            syncs = count_syncs(tr.train_step, dev)
        finally:
            close_trainer(tr)
            del tr
        results["profile_train"] = {"steps": args.profile_train, "micro_batch": micro, "syncs_per_step": syncs, **prof}
        save()
        print(f"\nWhere a CPM training step (batch 9, micro-batch {micro}; {args.profile_train} steps) spends its time (torch.profiler, self time of the "
              f"{prof['what']}: {prof['total_ms'] / args.profile_train:.0f} ms a step): " + percentages(prof["shares"]))
        print("By phase: " + percentages(prof["phases"]) + waiting(results["profile_train"]))
        print_top(prof)

    # the floor: FLOPs of each unit of work over the device's peak
    flops = count_work_flops(feat, dino, res)
    peak_dtype = dtype if dtype != torch.float32 or dev.type == "cpu" else torch.bfloat16
    measured = matmul_peak(dev, peak_dtype)
    named = named_peak(name) if dev.type == "cuda" else None
    peak = named or measured
    results["flops"], results["peak_tflops"] = flops, {"named": named, "measured_matmul": measured, "dtype": str(peak_dtype)}
    per_pic = flops["vae_picture"] + 8 * flops["unet_sample"]
    print(f"\nFLOPs at {res} px (counted on meta-device copies): UNet to up_blocks[1] {flops['unet_sample'] / 1e9:,.1f} GFLOP a sample "
          f"(full UNet {flops['unet_full_sample'] / 1e9:,.1f}; forward + backward to the prompt {flops['unet_train_sample'] / 1e9:,.1f}), "
          f"VAE encoder {flops['vae_picture'] / 1e9:,.1f} GFLOP a picture, DINOv2 at 224 {flops['dino_picture'] / 1e9:,.1f} GFLOP a picture; "
          f"a new picture at ensemble 8: {per_pic / 1e9:,.1f} GFLOP ({8 * flops['unet_sample'] / 1e9:,.1f} with its posterior stored)")
    print(f"Peak: {f'{named:.0f} TFLOP/s dense bf16 ({name}, data sheet); ' if named else ''}a {peak_dtype} matmul measured here: {measured:.1f} TFLOP/s; "
          f"the floor below uses {'the data sheet' if named else 'the measured matmul'}")
    n_extr = 2 * len(eval_recs)
    floors = [("featurize new image, ensemble 8, batch 4 (ours)", results.get("featurize_b4_ms"), per_pic, "ms"),
              ("featurize new image, ensemble 8, official-like", results.get("official_ms"), flops["vae_picture"] + 8 * flops["unet_full_sample"], "ms"),
              ("evaluate, CPM prompt, per feature extraction", results.get("evaluate_CPM_ms_per_extraction"),
               8 * flops["unet_sample"] + eval_img / n_extr * (flops["vae_picture"] + flops["dino_picture"]), "ms"),
              ("train step, CPM, batch 9 (posteriors stored)", 1000 * min((v for k, v in results.items() if k.startswith("train_cpm_")), default=float("nan")),
               18 * flops["unet_train_sample"], "ms")]
    print("\n| unit of work | measured | floor (FLOPs / peak) | measured / floor |\n|---|---|---|---|")
    for what, ms, fl, _ in floors:
        floor_ms = 1000 * fl / (peak * 1e12)
        results[f"floor {what}"] = {"measured_ms": ms, "floor_ms": floor_ms, "tflop": fl / 1e12}
        got = "not measured" if ms is None or ms != ms else f"{ms:.1f} ms"
        ratio = "" if ms is None or ms != ms else f"{ms / floor_ms:.2f}x"
        print(f"| {what} | {got} | {floor_ms:.2f} ms ({fl / 1e9:,.1f} GFLOP) | {ratio} |")
    if not sd21:
        print("(tiny model: its floor and ratios say nothing about the real one; they show that the rows run)")

    print("\n| measurement | value | peak MB |\n|---|---|---|")
    for what, value, mb in rows:
        print(f"| {what} | {value} | {'' if mb is None else f'{mb:.0f}'} |")
    if "evaluate_CPM_s_per_pair" in results:
        note = "" if sd21 else " (tiny model: a projection from a few tiny calls; it says nothing about the real model, only that the row runs)"
        print(f"\nProjected SPair-71k test with a CPM prompt (12,234 pairs): {12234 * results['evaluate_CPM_s_per_pair'] / 60:.1f} min{note}")
    best = min((v for k, v in results.items() if k.startswith("train_cpm_")), default=None)
    if best is not None:
        print(f"Projected 30k training steps with a CPM prompt (batch 9): {30000 * best / 3600:.2f} h" + ("" if sd21 else " (tiny model: meaningless)"))
    save()
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
