"""``sd4match datasets check``: what of a dataset is present, and the first thing missing."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from sd4match.data import open_dataset
from sd4match.data.download import interrupted_extractions
from sd4match.data.images import load_image
from sd4match.errors import DataError, first_line


@dataclass
class CheckReport:
    dataset: str
    root: Path
    splits: dict[str, dict] = field(default_factory=dict)  # split -> {"pairs": n, "categories": {cat: n}}
    n_images: int = 0
    n_missing: int = 0  # referenced images not on disk
    n_bad: int = 0  # present but unreadable (or of another size than annotated)
    problems: list[str] = field(default_factory=list)  # one line each, the first is the one to fix first
    mode: str = "decode"  # how the images were looked at

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.dataset} at {self.root}"]
        for split, info in self.splits.items():
            if info is None:
                lines.append(f"  {split:<5} missing (no pair list)")
                continue
            if "error" in info:
                lines.append(f"  {split:<5} unreadable: {info['error']}")
                continue
            cats = ", ".join(f"{c} {n}" for c, n in sorted(info["categories"].items()))
            lines.append(f"  {split:<5} {info['pairs']} pairs ({cats})")
            for g, counts in info.get("groups", {}).items():
                lines.append(f"  {'':<5} by {g}: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))
            if "geo_aware" in info:
                lines.append(f"  {'':<5} {_geo_line(info['pairs'], info['geo_aware'])}")
        if self.mode == "none":
            lines.append(f"  images: {self.n_images} referenced, not looked at")
        else:
            how = {"decode": "decoded", "headers": "headers read (--quick)"}.get(self.mode, self.mode)
            found = self.n_images - self.n_missing
            lines.append(f"  images: {found} of {self.n_images} referenced found" + (f" ({self.n_missing} missing)" if self.n_missing else "")
                         + f", {how}" + (f", {self.n_bad} unreadable" if self.n_bad else ", all readable" if found else ""))
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines.extend(f"    {p}" for p in self.problems)
        else:
            lines.append("  complete")
        return "\n".join(lines)


def _geo_line(n_pairs: int, geo: dict) -> str:
    """Whether ``score`` can report the split's geometry-aware subset, and if not, why."""
    if geo["pairs"] == n_pairs:
        return f"geometry-aware subset: {geo['points']} points in its {n_pairs} pairs"
    lack = geo["source"] or "meta.geo_aware"
    return f"geometry-aware subset: left out of scores ({geo['pairs']} of the {n_pairs} pairs have it, the others lack {lack})"


def check_dataset(name: str, root: str | Path, *, images: bool | str = "decode", progress: bool = False, options: dict | None = None) -> CheckReport:
    """Read every split's pair list and annotations, and every image.

    Args:
        images: ``"decode"`` (default: every image decoded in full, so a truncated file is
            found), ``"headers"`` (sizes from the headers only, fast), or ``"none"``;
            ``True``/``False`` mean ``"headers"``/``"none"``.
        progress: show a progress bar over the images.

    Every unreadable image is listed in ``problems`` (not just the first).

    Raises:
        DataError: ``root`` is not in the dataset's layout at all, or holds an
            interrupted extraction (``sd4match download`` was stopped half-way).
    """
    mode = ({True: "headers", False: "none"}[images]) if isinstance(images, bool) else images
    if mode not in ("decode", "headers", "none"):
        raise ValueError(f"images must be decode, headers or none, got {images!r}")
    for leftover in interrupted_extractions(Path(root)):
        raise DataError(leftover, f"interrupted extraction; run `sd4match download {name} --root {root}` again")
    ds = open_dataset(name, root, **(options or {}))
    rep = CheckReport(name, Path(root))
    rep.mode = mode
    absent = [entry for entry in ds.required if not (ds.root / entry).exists()]
    for entry in absent:
        rep.problems.append(f"{ds.root / entry}: missing")
    seen: dict[str, tuple | None] = {}
    for split in ds.splits:
        if ds.split_file(split) is None:
            if not ds.every_split:
                continue
            rep.splits[split] = None
            rep.problems.append(f"{ds.root}: pair list of split {split!r} is missing ({ds.expected_split_file(split)})")
            continue
        try:
            recs = ds.pairs(split)
        except DataError as e:
            # the layout's own folders missing say more than the first file that could not be read
            rep.splits[split] = {"error": f"{' and '.join(str(a) for a in absent)} missing" if absent else first_line(e)}
            rep.problems.append(str(e))
            continue
        rep.splits[split] = {"pairs": len(recs), "categories": dict(Counter(r.category for r in recs))}
        groups = {g: dict(Counter(r.meta["groups"][g] for r in recs if g in r.meta.get("groups", {}))) for g in ds.groups}
        if any(groups.values()):
            rep.splits[split]["groups"] = {g: c for g, c in groups.items() if c}
        known = [r for r in recs if "geo_aware" in r.meta]
        if ds.geo_source or known:
            rep.splits[split]["geo_aware"] = {"pairs": len(known), "points": sum(sum(r.meta["geo_aware"]) for r in known), "source": ds.geo_source}
        for r in recs:
            for rel, size in zip(r.files, (r.src_size, r.trg_size)):
                seen.setdefault(rel, tuple(size))
    rep.n_images = len(seen)
    if mode == "none":
        return rep

    def one(rel: str) -> tuple[str, str] | None:
        if not (ds.root / rel).is_file():
            return "missing", f"{ds.root / rel}: image file is missing"
        try:
            if mode == "headers":
                ds.image_size(rel)
            else:
                img = load_image(ds.root / rel)
                want = seen[rel]
                if want and tuple(img.size) != want:
                    return "bad", f"{ds.root / rel}: image is {img.width}x{img.height} but the annotation says {want[0]}x{want[1]}"
        except DataError as e:
            return "bad", str(e)
        return None

    rels = sorted(seen)
    with ThreadPoolExecutor(max_workers=4) as ex:
        for got in tqdm(ex.map(one, rels), total=len(rels), unit="img", desc=f"check images ({mode})", disable=None if progress else True):
            if got:
                what, msg = got
                rep.n_missing += what == "missing"
                rep.n_bad += what == "bad"
                rep.problems.append(msg)
    return rep
