"""``sd4match datasets check``: what of a dataset is present, and the first thing missing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sd4match.data import open_dataset
from sd4match.data.download import interrupted_extractions
from sd4match.errors import DataError


@dataclass
class CheckReport:
    dataset: str
    root: Path
    splits: dict[str, dict] = field(default_factory=dict)  # split -> {"pairs": n, "categories": {cat: n}}
    n_images: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, the first is the one to fix first

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.dataset} at {self.root}"]
        for split, info in self.splits.items():
            if info is None:
                lines.append(f"  {split:<5} missing")
                continue
            cats = ", ".join(f"{c} {n}" for c, n in sorted(info["categories"].items()))
            lines.append(f"  {split:<5} {info['pairs']} pairs ({cats})")
        lines.append(f"  images: {self.n_images} referenced, all readable" if self.ok else f"  images: {self.n_images} referenced")
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s); first: {self.problems[0]}")
        else:
            lines.append("  complete")
        return "\n".join(lines)


def check_dataset(name: str, root: str | Path, *, images: bool = True) -> CheckReport:
    """Read every split's pair list and annotations, and the header of every image.

    Raises:
        DataError: ``root`` is not in the dataset's layout at all, or holds an
            interrupted extraction (``sd4match download`` was stopped half-way).
    """
    for leftover in interrupted_extractions(Path(root)):
        raise DataError(leftover, f"interrupted extraction; run `sd4match download {name} --root {root}` again")
    ds = open_dataset(name, root)
    rep = CheckReport(name, Path(root))
    for entry in ds.required:
        if not (ds.root / entry).exists():
            rep.problems.append(f"{ds.root / entry}: missing")
    seen: set[str] = set()
    for split in ds.splits:
        if ds.split_file(split) is None:
            rep.splits[split] = None
            rep.problems.append(f"{ds.root}: pair list of split {split!r} is missing ({ds.expected_split_file(split)})")
            continue
        try:
            recs = ds.pairs(split)
        except DataError as e:
            rep.splits[split] = None
            rep.problems.append(str(e))
            continue
        rep.splits[split] = {"pairs": len(recs), "categories": dict(Counter(r.category for r in recs))}
        for r in recs:
            seen.update((r.src, r.trg))
    rep.n_images = len(seen)
    if images:
        for rel in sorted(seen):
            try:
                ds.image_size(rel)
            except DataError as e:
                rep.problems.append(str(e))
    return rep
