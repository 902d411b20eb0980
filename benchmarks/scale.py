"""How cost grows with the work: peak memory and time of ``pairs``, ``score`` and
``evaluate`` at two sizes of one synthetic SPair-71k test split, and their ratios.

The tree is SPair-71k's own layout: the real pair annotations of the fixtures
(``$SD4MATCH_FIXTURES/SPair-71k``) replicated over stand-in pictures, their points and
boxes rescaled to the pictures' size. Pairs are grouped by category as in the real test
split, each category drawing its pairs from its own pool of pictures (seeded), so that
pairs of new pictures interleave with pairs of pictures already seen. The smaller split is
the first pairs of the larger one.

Each command runs in its own process (the CLI, as a user runs it); peak memory is that
process's maximum resident set size. ``evaluate`` uses a tiny random SD (built from config,
``sd4match.testing``), so its memory is what the pipeline holds (pictures, queue, store),
not the model. It is then run a second time with ``--cache-dir``, every map stored, and
the pictures it decoded are counted.

    python benchmarks/scale.py                          # 100, 900 and 2,700 pairs (about 6 minutes on 2 cores)
    python benchmarks/scale.py --pairs 300,900 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SD4MATCH_FIXTURES", REPO.parent / "shared" / "fixtures"))
SIZE = (500, 375)  # the stand-in pictures' (W, H), SPair-71k's typical size

# each command runs through this wrapper: it counts the pictures decoded (PIL's ImageFile.load,
# once per picture object) and, at exit, writes them and the process's peak resident set
# (VmHWM: of this process's own memory, not of the process that started it)
_CHILD = """
import json, os, sys
if os.environ.get("SD4MATCH_BENCH_SRC"):  # another checkout's sources, ahead of an editable install's finder
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower() and "editable" not in str(f).lower()]
    sys.path.insert(0, os.environ["SD4MATCH_BENCH_SRC"])
from PIL import ImageFile
seen = []
_load = ImageFile.ImageFile.load
def load(im):
    if getattr(im, "filename", None) and not getattr(im, "_sd4match_counted", False):
        seen.append(im.filename)
        im._sd4match_counted = True
    return _load(im)
ImageFile.ImageFile.load = load
from sd4match.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    with open(os.environ["SD4MATCH_BENCH_REPORT"], "w") as fh:
        json.dump({"decoded": seen, "peak_kb": hwm}, fh)
sys.exit(rc or 0)
"""


def build_tree(root: Path, n_pairs: int, *, pairs_per_category: int = 680, pictures_per_category: int = 30, seed: int = 0) -> list[str]:
    """A SPair-71k tree whose test split has ``n_pairs`` pairs in category order, at the real
    test split's density (12,234 pairs over 18 categories: about 680 a category); returns the
    pair ids."""
    templates = [json.loads(f.read_text()) for f in sorted((FIXTURES / "SPair-71k" / "PairAnnotation" / "test").glob("*.json"))]
    if not templates:
        raise SystemExit(f"no SPair-71k pair annotations under {FIXTURES} (set SD4MATCH_FIXTURES)")
    rng = np.random.default_rng(seed)
    per_cat = pairs_per_category
    categories = -(-n_pairs // per_cat)
    ids, made = [], set()
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    (root / "Layout" / "large").mkdir(parents=True)
    for c in range(categories):
        cat = f"cat{c:02d}"
        for j in range(min(per_cat, n_pairs - len(ids))):
            t = templates[(c * per_cat + j) % len(templates)]
            a, b = rng.choice(pictures_per_category, 2, replace=False)
            ann = dict(t)
            pid = f"{len(ids) + 1:06d}-{cat}_{a:03d}-{cat}_{b:03d}"
            for side, k in (("src", a), ("trg", b)):
                w, h = t[f"{side}_imsize"][:2]
                sx, sy = SIZE[0] / w, SIZE[1] / h
                ann[f"{side}_imname"] = f"{cat}_{k:03d}.jpg"
                ann[f"{side}_imsize"] = [SIZE[0], SIZE[1], 3]
                ann[f"{side}_kps"] = [[round(x * sx, 2), round(y * sy, 2)] for x, y in t[f"{side}_kps"]]
                x0, y0, x1, y1 = t[f"{side}_bndbox"]
                ann[f"{side}_bndbox"] = [round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)]
                pic = root / "JPEGImages" / cat / ann[f"{side}_imname"]
                if pic not in made:
                    pic.parent.mkdir(parents=True, exist_ok=True)
                    g = np.random.default_rng(hash((c, int(k))) % 2**32)
                    Image.fromarray(g.integers(0, 256, (SIZE[1] // 8, SIZE[0] // 8, 3), dtype=np.uint8)).resize(SIZE).save(pic, quality=90)
                    made.add(pic)
            ann["category"], ann["filename"] = cat, f"{pid}:{cat}"
            (root / "PairAnnotation" / "test" / f"{pid}:{cat}.json").write_text(json.dumps(ann))
            ids.append(f"{pid}:{cat}")
    return ids


def run(args: list[str]) -> dict:
    """One CLI process: {"seconds", "mb" (its peak resident MiB), "decoded" (pictures)}."""
    fd, log = tempfile.mkstemp(suffix=".log")
    report = log + ".json"
    with os.fdopen(fd, "w") as fh:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=fh, stderr=subprocess.STDOUT,
                           env={**os.environ, "SD4MATCH_BENCH_REPORT": report})
        dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"sd4match {args[0]} failed ({p.returncode}):\n{Path(log).read_text()[-3000:]}")
    got = json.loads(Path(report).read_text())
    return {"seconds": dt, "mb": got["peak_kb"] / 1024, "decoded": len(got["decoded"])}


def measure(tmp: Path, n: int, model: Path) -> dict:
    root = tmp / "SPair-71k"
    layout = root / "Layout" / "large" / "test.txt"
    ids = json.loads((tmp / "ids.json").read_text())[:n]
    layout.write_text("\n".join(ids) + "\n")
    res: dict = {"pairs": n, "pictures": len({p for i in ids for p in i.split(":")[0].split("-")[1:]})}
    at = ["--dataset", "spair", "--root", str(root), "--split", "test"]
    got = run(["pairs", *at, "--out", str(tmp / f"pairs{n}.jsonl")])
    res["pairs_s"], res["pairs_mb"] = got["seconds"], got["mb"]
    out = tmp / f"eval{n}"
    common = ["evaluate", *at, "--model", str(model), "--resolution", "64", "--ensemble", "8", "--device", "cpu", "--match", "nn"]
    got = run([*common, "--out", str(out)])
    res["evaluate_s"], res["evaluate_mb"] = got["seconds"], got["mb"]
    res["work"] = json.loads((out / "run-info.json").read_text()).get("stream", {}).get("work", {})
    got = run(["score", *at, "--predictions", str(out / "predictions.jsonl"), "--json"])
    res["score_s"], res["score_mb"] = got["seconds"], got["mb"]
    cache = tmp / f"cache{n}"
    res["decodes_first"] = run([*common, "--out", str(tmp / f"warm{n}"), "--cache-dir", str(cache)])["decoded"]
    got = run([*common, "--out", str(tmp / f"cached{n}"), "--cache-dir", str(cache)])
    res["cached_s"], res["decodes_cached"] = got["seconds"], got["decoded"]
    res["cached_same_predictions"] = (out / "predictions.jsonl").read_bytes() == (tmp / f"cached{n}" / "predictions.jsonl").read_bytes()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="100,900,2700", help="the split sizes (the first pairs of the largest), compared with the first")
    ap.add_argument("--pairs-per-category", type=int, default=680, help="pairs a category (SPair-71k test: about 680)")
    ap.add_argument("--pictures-per-category", type=int, default=30, help="stand-in pictures a category's pairs are drawn from")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--src", help="measure the sd4match of another checkout's src/ folder (e.g. an earlier commit's, to compare)")
    args = ap.parse_args(argv)
    sizes = sorted(int(x) for x in args.pairs.split(","))
    if args.src:
        os.environ["SD4MATCH_BENCH_SRC"] = str(Path(args.src).resolve())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        ids = build_tree(tmp / "SPair-71k", sizes[-1], pairs_per_category=args.pairs_per_category, pictures_per_category=args.pictures_per_category)
        (tmp / "ids.json").write_text(json.dumps(ids))
        model = tmp / "tiny-sd"  # made in a child process: this one stays small
        subprocess.run([sys.executable, "-c", f"from sd4match.testing import tiny_sd; tiny_sd({str(model)!r})"], check=True, capture_output=True)
        print(f"built a {sizes[-1]}-pair SPair-71k test tree in {time.perf_counter() - t0:.1f} s "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", flush=True)
        rows = [measure(tmp, n, model) for n in sizes]
    head = " | ".join(f"{r['pairs']} pairs ({r['pictures']} pictures)" for r in rows)
    ratios = " | ".join(f"x{r['pairs'] / rows[0]['pairs']:g} pairs" for r in rows[1:])
    print(f"\n| command | {head} | ratio to the first: {ratios} |")
    print("|---|" + "---|" * (2 * len(rows) - 1))
    for name, unit, fmt in (("pairs", "mb", ".0f"), ("score", "mb", ".0f"), ("evaluate", "mb", ".0f"), ("pairs", "s", ".1f"), ("score", "s", ".1f"),
                            ("evaluate", "s", ".1f")):
        k = f"{name}_{unit}"
        label = "peak memory" if unit == "mb" else "time"
        vals = " | ".join(f"{r[k]:{fmt}} {'MiB' if unit == 'mb' else 's'}" for r in rows)
        print(f"| `{name}` {label} | {vals} | " + " | ".join(f"{r[k] / rows[0][k]:.2f}" for r in rows[1:]) + " |")
    print("| `evaluate --cache-dir`: pictures decoded, first run / a rerun with every map stored | "
          + " | ".join(f"{r['decodes_first']} / {r['decodes_cached']}" for r in rows) + " |" + " |" * (len(rows) - 1))
    print("| `evaluate --cache-dir`: the rerun's time, its predictions equal the first run's | "
          + " | ".join(f"{r['cached_s']:.1f} s, {'equal' if r['cached_same_predictions'] else 'DIFFERENT'}" for r in rows) + " |" + " |" * (len(rows) - 1))
    for model, unit in (("vae", "pictures"), ("unet", "samples")):
        cells = []
        for r in rows:
            w = r["work"].get(model)
            cells.append(f"{w['calls']} calls, {w['items']} {unit}, {w['padded']} padding ({100 * w['padded'] / max(1, w['items']):.2f} %)" if w else "")
        print(f"| `evaluate`: {model.upper()} work, padding copies among it | " + " | ".join(cells) + " |" + " |" * (len(rows) - 1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
