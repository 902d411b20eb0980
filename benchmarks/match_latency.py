"""Latency of one click on the `sd4match serve` page: a new pair vs a pair whose features are cached.

    python benchmarks/match_latency.py --model effnet-lite0                 # real weights, offline
    python benchmarks/match_latency.py --size sd21 --device cuda --dtype bf16 --ensemble 8

A click on a cached pair runs what the page's /api/match runs: the match of one point
(kernel soft-argmax), the similarity map of that point over the other image, and the
heat map PNG. A click on a new pair first extracts both images' features. Random weights
for the SD sizes (speed does not depend on their values); the pictures are the PF-Willow
fixture photos or any two you pass.
"""

from __future__ import annotations

import argparse
import base64
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="effnet-lite0, or any --model sd4match takes (weights needed); default: --size")
    ap.add_argument("--size", choices=("tiny", "sd21"), default="tiny", help="random-weight SD architecture when --model is not given")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--resolution", type=int, help="default: the model's (768 for SD, 128 for --size tiny)")
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--images", nargs=2, type=Path, help="two pictures (default: a PF-Willow fixture pair)")
    ap.add_argument("--clicks", type=int, default=20)
    args = ap.parse_args()

    from sd4match.usermatch import Matcher, open_image
    from sd4match.viz import heat_image

    dev = torch.device(args.device)
    amp = None if args.dtype == "fp32" else args.dtype
    if args.model:
        from sd4match.features import load_featurizer

        kw = {"ensemble": args.ensemble, "amp_dtype": amp}
        if args.resolution:
            kw["resolution"] = args.resolution
        feat, name = load_featurizer(args.model, **kw).to(dev), args.model
    else:
        from featurize import build

        feat = build(args.size, tempfile.mkdtemp()).to(dev)
        feat.reconfigure(ensemble=args.ensemble, resolution=args.resolution or (768 if args.size == "sd21" else 128), amp_dtype=amp)
        name = f"{args.size} architecture, random weights"
    m = Matcher(feat, "empty")
    if args.size == "sd21" and not args.model:  # the tiny text encoder does not fit the SD 2.1 UNet: feed a 1024-d prompt
        m._emb = torch.zeros(1, 77, 1024, device=dev)
    if args.images:
        paths = args.images
    else:
        root = Path(__file__).resolve().parents[2] / "shared/fixtures/pf-willow/PF-dataset/car(G)"
        paths = [root / "Cars_006a.png", root / "Cars_007a.png"]
    a, b = (open_image(p) for p in paths)

    def click(x, y):
        r = m.match_points(a, b, [("click", (x, y))])[0]
        sim = m.similarity(a, b, (x, y))
        png = io.BytesIO()
        heat_image(sim, b.image.size).save(png, format="PNG")
        base64.b64encode(png.getvalue())
        sync(dev)
        return r

    t0 = time.perf_counter()
    click(a.size[0] / 2, a.size[1] / 2)
    first = time.perf_counter() - t0
    times = []
    for i in range(args.clicks):
        x, y = (i * 37 % a.size[0]) + 0.5, (i * 23 % a.size[1]) + 0.5
        t0 = time.perf_counter()
        click(x, y)
        times.append(time.perf_counter() - t0)
    dname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"
    print(f"model: {name} | device: {dname} | torch {torch.__version__} | dtype {args.dtype} | "
          f"ensemble {getattr(feat.config, 'ensemble', '-')} | resolution {getattr(feat.config, 'resolution', '-')} | grid {tuple(m.features(a, b)[0].shape[-2:])}")
    print("| click | ms |")
    print("|---|---|")
    print(f"| new pair (extract both images, then match) | {first * 1000:.0f} |")
    print(f"| cached pair, median of {args.clicks} | {statistics.median(times) * 1000:.1f} |")
    print(f"| cached pair, slowest | {max(times) * 1000:.1f} |")


if __name__ == "__main__":
    main()
