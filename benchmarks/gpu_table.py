"""The tables for RESULTS.md from the JSONs of a ``benchmarks/gpu.sh`` run.

    python benchmarks/gpu_table.py bench-out/eager.json bench-out/compiled.json bench-out/compiled-train.json

Prints, in markdown: every measured row of every part side by side (a part's column is
empty where it did not measure the row; a lever's row says its number or why it was not
measured); the three targets of the throughput work (a new picture at ensemble 8, batch 4;
a CPM extraction; a CPM training step), each with the best row that measures it, its part,
and whether it is met; the floor and the ratio to it; and each part's profile shares
(of a CPM evaluation, and of CPM training steps by kernel and by phase).
A part missing or cut short is named, never filled in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

def percentages(shares: dict[str, float]) -> str:
    """``{"convolution": 0.27, ...}`` as "convolution 27.0 %, ..." (a profile's shares or phases)."""
    return ", ".join(f"{c} {100 * v:.1f} %" for c, v in shares.items())


#: (what, target in ms, the unit of work's words): the targets of the throughput issue. A row
#: measures a target when its name holds those words: the plain row and every lever's row of
#: that unit of work (``lever <name>: <unit of work>``), never a row that only reports a
#: compilation time (those start with two spaces).
TARGETS = (
    ("new picture, ensemble 8, batch 4", 20.0, "featurize new image, ensemble 8, batch 4, per image"),
    ("CPM evaluation, per extraction", 20.0, "CPM prompt, per feature extraction"),
    ("training step, CPM, batch 9", 120.0, "train step, cpm, batch 9"),
)
#: a row's value in ms, by its unit (rows in other units measure no time of a unit of work)
TO_MS = {"ms": 1.0, "s": 1000.0}


def waiting(prof: dict) -> str:
    """What a CUDA profile adds about waiting: the share of the wall time the GPU computed, and
    a training step's synchronisations (empty where the profile has neither)."""
    out = f"; the GPU busy {100 * prof['busy']:.0f} % of the wall time" if prof.get("busy") is not None else ""
    if prof.get("syncs_per_step") is not None:
        out += f"; {prof['syncs_per_step']} synchronisations a step"
    return out


def rows_of(res: dict) -> dict[str, dict]:
    """The measured rows of one part's JSON: name -> {"value", "unit", "peak_mb"}, or {"error"} for a lever not measured."""
    return {k: v for k, v in res.items() if isinstance(v, dict) and ("value" in v or (k.startswith("lever ") and "error" in v))}


def cell(v: dict | None) -> str:
    if v is None:
        return ""
    if "error" in v:
        return f"not measured ({v['error'][:80]})"
    return f"{v['value']:.2f} {v['unit']}" + (f" ({v['peak_mb'] / 1024:.1f} GB)" if v.get("peak_mb") else "")


def best(parts: dict[str, dict], work: str) -> tuple[float, str, str] | None:
    """(ms, row, part) of the fastest row of the unit of work ``work`` (``TARGETS``), over every part."""
    found = [(v["value"] * TO_MS[v["unit"]], k, p) for p, res in parts.items() for k, v in rows_of(res).items()
             if v.get("unit") in TO_MS and work in k and not k.startswith(" ")]
    return min(found) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="the parts' JSON files (OUT/<part>.json)")
    args = ap.parse_args()
    parts: dict[str, dict] = {}
    for f in args.json:
        if not f.is_file():
            print(f"(part {f.stem}: {f} is missing: not measured)")
            continue
        parts[f.stem] = json.loads(f.read_text())
    if not parts:
        raise SystemExit("gpu_table.py: no part's JSON was found")
    setups = {p: r.get("setup", {}) for p, r in parts.items()}
    for p, s in setups.items():
        print(f"- {p}: {s.get('size')} on {s.get('device_name')} ({s.get('device')}), weights {s.get('dtype')}, compile {s.get('compile')}, torch {s.get('torch')}")
        for k in (k for k in parts[p] if k.startswith("not measured: ")):
            print(f"  - {k[len('not measured: '):]}: not measured (its time budget was spent)")
        if "flops" not in parts[p]:
            print("  - cut short: the part ended before its floor (its rows so far are below)")

    names: list[str] = []
    for res in parts.values():
        names += [k for k in rows_of(res) if k not in names]
    print("\n| measurement | " + " | ".join(parts) + " |\n|---|" + "---|" * len(parts))
    for k in names:
        print(f"| {k} | " + " | ".join(cell(rows_of(res).get(k)) for res in parts.values()) + " |")

    tiny = any(s.get("size") != "sd21" for s in setups.values())
    if tiny:
        print("\n(not the sd21 architecture: the targets, the floor and the ratios below say nothing about the real models; they show that the rows run)")
    print("\n| target | best measured | row (part) | target | met |\n|---|---|---|---|---|")
    for what, target, work in TARGETS:
        b = best(parts, work)
        if b is None:
            print(f"| {what} | not measured | | ≤ {target:g} ms | |")
        else:
            met = "(tiny)" if tiny else "yes" if b[0] <= target else "no"
            print(f"| {what} | {b[0]:.1f} ms | {b[1]} ({b[2]}) | ≤ {target:g} ms | {met} |")

    floors = list(dict.fromkeys(k for res in parts.values() for k in res if k.startswith("floor ")))
    if floors:
        peak = next(res["peak_tflops"] for res in parts.values() if "peak_tflops" in res)
        print(f"\nThe floor (peak {peak['named'] or peak['measured_matmul']:.3g} TFLOP/s, "
              f"{'the data sheet' if peak['named'] else 'a measured matmul'}; a matmul measured {peak['measured_matmul']:.3g}):")
        print("\n| unit of work | best measured | floor | measured / floor |\n|---|---|---|---|")
        for k in floors:  # each part's measurement beside its own floor (a part's split sets its evaluate floor)
            rows = [(r["measured_ms"], r["floor_ms"]) for r in (res[k] for res in parts.values() if k in res)]
            got = [(m, fl) for m, fl in rows if m is not None and m == m]  # NaN: not measured
            m, fl = min(got) if got else (None, min(fl for _, fl in rows))
            print(f"| {k[len('floor '):]} | {'not measured' if m is None else f'{m:.1f} ms'} | {fl:.2f} ms | {'' if m is None else f'{m / fl:.2f}x'} |")

    for p, res in parts.items():
        if "profile" in res:
            pr = res["profile"]
            print(f"\nProfile ({p}, CPM evaluation of {pr['pairs']} pairs, self time of the {pr['what']}, {pr['total_ms']:.0f} ms): "
                  + percentages(pr["shares"]) + waiting(pr))
        if "profile_train" in res:
            pr = res["profile_train"]
            print(f"\nProfile ({p}, CPM training, batch 9, micro-batch {pr['micro_batch']}, {pr['steps']} steps, self time of the {pr['what']}, "
                  f"{pr['total_ms'] / pr['steps']:.0f} ms a step): " + percentages(pr["shares"]) + "; by phase: " + percentages(pr["phases"]) + waiting(pr))


if __name__ == "__main__":
    main()
