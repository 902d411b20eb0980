"""``--dataset custom --root DIR``: your own annotated pairs, as JSON Lines.

``DIR`` holds ``trn.jsonl``, ``val.jsonl`` and/or ``test.jsonl``, one pair a line in the
format ``sd4match pairs`` writes (so a benchmark's split exported there reads back as it
was). A pair needs only:

- ``src``, ``trg``: picture paths relative to ``DIR`` (or absolute);
- ``src_kps``, ``trg_kps``: ``[[x, y], ...]``, row i of one the match of row i of the
  other, in the pictures' stored pixels (EXIF orientation is not applied, as in every
  benchmark: a picture whose EXIF turns it is refused when its size is not given).

What is left out is made: ``id`` the line's 0-based index among the pairs, ``category`` the
source picture's folder, ``src_size``/``trg_size`` read from the pictures' headers, and
``pck_base`` max(w, h) of ``trg_bbox`` (``[x1, y1, x2, y2]``) when one is given, else
max(W, H) of the target picture (PF-Pascal's rule), in both frames (``pck_bases``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd4match.data.base import PairDataset
from sd4match.data.images import exif_orientation
from sd4match.data.records import PairRecord, as_points, geo_aware_mask, geo_twins_points, keypoint_ids, pck_bases
from sd4match.errors import DataError
from sd4match.fileio import json_lines

#: what a pair of a custom list must give (the rest is made)
NEEDED = ("src", "trg", "src_kps", "trg_kps")
#: how far outside its picture a point may lie (pixels, less than this) before it is called a mistake (x and y swapped,
#: another picture's, -1 for hidden)
OUTSIDE = 1.0


class CustomPairs(PairDataset):
    name = "custom"
    splits = ("trn", "val", "test")
    base_rule = "bbox"
    every_split = False
    pairs_from_root = True
    convention = "your own pairs: max(w, h) of the target box when given, else max(W, H) of the target picture"

    def layout_problem(self) -> str | None:
        if self.root.is_file():
            return "a file: --root is the folder that holds the pair lists, named trn.jsonl, val.jsonl or test.jsonl (picture paths relative to it)"
        if not self.root.is_dir():
            return "dataset root does not exist"
        if not self.available_splits():
            return "not a custom pair root: expected trn.jsonl, val.jsonl or test.jsonl in it (`sd4match pairs --out` writes one)"
        return None

    def split_file(self, split: str) -> Path | None:
        p = self.root / f"{split}.jsonl"
        return p if p.is_file() else None

    def expected_split_file(self, split: str) -> str:
        return f"{split}.jsonl"

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        out: list[PairRecord] = []
        lines: dict[str, str] = {}
        for where, d in json_lines(path, DataError):
            r = self._record(d, where, len(out))
            if r.id in lines:
                raise DataError(where, f"pair id {r.id!r} is given twice (first at {lines[r.id]}); predictions are matched to pairs by id")
            lines[r.id] = where
            out.append(r)
        return out

    def _record(self, d, where: str, index: int) -> PairRecord:
        if not isinstance(d, dict):
            raise DataError(where, f"expected a pair (a JSON object with {', '.join(NEEDED)}), not a {type(d).__name__}")
        missing = [k for k in NEEDED if k not in d]
        if missing:
            raise DataError(where, f"missing key {missing[0]!r} (a pair needs {', '.join(NEEDED)})")
        src, trg = (d[k] for k in ("src", "trg"))
        if not all(isinstance(p, str) and p.strip() for p in (src, trg)):
            raise DataError(where, "src and trg must be picture paths (relative to the root, or absolute)")
        src_kps, trg_kps = as_points(d["src_kps"], where, "src_kps"), as_points(d["trg_kps"], where, "trg_kps")
        if len(src_kps) != len(trg_kps):
            raise DataError(where, f"src_kps has {len(src_kps)} points but trg_kps {len(trg_kps)}: row i of one is the match of row i of the other")
        src_size, trg_size = self._size(d, "src", where), self._size(d, "trg", where)
        for side, kps, size in (("src", src_kps, src_size), ("trg", trg_kps, trg_size)):
            # -1 itself is outside: many annotation files mark a hidden point [-1, -1], which would be scored as a position
            outside = np.nonzero(((kps <= -OUTSIDE) | (kps > np.asarray(size, dtype=np.float64) + OUTSIDE)).any(axis=1))[0]
            if len(outside):
                i = int(outside[0])
                hint = "; a hidden point is left out of both lists, not marked -1" if (kps[i] < 0).any() else ""
                raise DataError(where, f"{side}_kps[{i}] = {kps[i].tolist()} lies outside the {size[0]}x{size[1]} picture {d[side]} "
                                       f"(points are [x, y] in its stored pixels{hint})")
        boxes = {side: _box(d.get(f"{side}_bbox"), where, f"{side}_bbox") for side in ("src", "trg")}
        base = d.get("pck_base")
        if base is None:
            base = pck_bases("bbox" if boxes["trg"] is not None else "image", trg_size, trg_kps, boxes["trg"])
        elif not (isinstance(base, dict) and all(isinstance(base.get(k), (int, float)) and (base[k] > 0 or not len(trg_kps)) for k in ("standard", "sd4match"))):
            raise DataError(where, "pck_base must be {\"standard\": b, \"sd4match\": b} with b > 0 (or left out: it is made from trg_bbox or the picture)")
        category = d.get("category")
        if category is None:
            parent = Path(src).parent.name
            category = parent or "all"
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(where, f"meta must be a JSON object, not a {type(meta).__name__}")
        rec = PairRecord(id=str(d.get("id", index)), category=str(category), src=src, trg=trg, src_size=src_size, trg_size=trg_size,
                         src_kps=src_kps, trg_kps=trg_kps, src_bbox=boxes["src"], trg_bbox=boxes["trg"],
                         pck_base={k: float(base[k]) for k in ("standard", "sd4match")}, meta=dict(meta))
        if "geo_aware" in meta:
            geo_aware_mask(rec, where)
        if "geo_twins" in meta:
            geo_twins_points(rec, where)
        if "kps_ids" in meta and keypoint_ids(rec) is None:
            raise DataError(where, f"pair {rec.id!r}: meta.kps_ids must be a list of {rec.n_points} keypoint ids, one per keypoint")
        return rec

    def _size(self, d: dict, side: str, where: str) -> tuple[int, int]:
        """The (W, H) the pair gives (checked against the pixels when they are decoded), else the header's."""
        given = d.get(f"{side}_size")
        if given is not None:
            try:
                w, h = (int(v) for v in given)
            except (TypeError, ValueError):
                raise DataError(where, f"{side}_size is {given!r}, expected [W, H]") from None
            if w < 2 or h < 2:
                raise DataError(where, f"{side}_size is {given!r}: too small to match")
            return w, h
        first = d[side] not in self._sizes  # a picture of many pairs: its header read once
        size = self.image_size(d[side])  # a missing or unreadable picture named first
        turned = exif_orientation(self.root / d[side]) if first else None
        if turned not in (None, 1):
            raise DataError(self.root / d[side], f"its EXIF orientation ({turned}) turns it when shown, but points are read in its stored pixels: "
                                                 "save it upright (e.g. PIL's ImageOps.exif_transpose) and give the points there")
        return size


def _box(value, where: str, what: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(where, f"{what} is {value!r}, expected [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
    return box  # type: ignore[return-value]
