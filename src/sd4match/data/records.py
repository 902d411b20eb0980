"""Pair records: the one structure every dataset reader returns.

A record holds what a pair needs for matching and scoring: image paths (relative to the
dataset root), image sizes, keypoints in original pixels, boxes, and the PCK threshold
base under both protocols (DESIGN.md). ``to_json`` writes the pair-export format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from sd4match.errors import DataError
from sd4match.fileio import json_lines

Protocol = Literal["standard", "sd4match"]
PROTOCOLS: tuple[str, ...] = ("standard", "sd4match")
BaseRule = Literal["bbox", "image", "kps"]
#: Side of the square frame of the official SD4Match code (the ``sd4match`` protocol).
SD4MATCH_RESOLUTION = 768
#: Ground-truth points are clamped to [CLAMP_EPS, R - 1 - CLAMP_EPS] in the sd4match frame.
CLAMP_EPS = 1e-4


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def as_points(values: Any, where: str, what: str) -> np.ndarray:
    """Turn a list of (x, y) into a float64 array (N, 2); reject bad shapes and NaN/inf."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(where, f"{what} is not a list of [x, y] numbers") from None
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(where, f"{what} has shape {list(arr.shape)}, expected [N, 2]")
    if not np.isfinite(arr).all():
        row = int(np.nonzero(~np.isfinite(arr).all(axis=1))[0][0])
        raise DataError(where, f"{what}[{row}] = {arr[row].tolist()} is not finite")
    return arr


def read_json(path: Path, keys: Sequence[str] = (), expected: str = "") -> Any:
    """A JSON annotation file; not valid JSON, or (with ``keys``) not an object holding them,
    is a ``DataError`` naming the file (``expected`` says what it should hold)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    if keys:
        missing = [k for k in keys if not isinstance(d, dict) or k not in d]
        if missing:
            raise DataError(path, f"missing key {missing[0]!r}" + (f" (expected {expected})" if expected else ""))
    return d


def geo_aware_points(groups: Sequence[Sequence[int]], pair_slots: Sequence[int], trg_visible: Iterable[int]) -> list[bool]:
    """Which keypoints of a pair are *geometry-aware* (Zhang et al., "Telling Left from
    Right", CVPR 2024; GeoAware-SC's ``eval_spair.py``): those in a group of keypoints that
    mirror one another (``groups``: left and right eye, the four wheels) of which at least
    two are visible in the target picture, so that a match can land on the wrong twin.

    Args:
        groups: the dataset's groups of keypoint ids (slots) that mirror one another.
        pair_slots: the keypoint id of each of the pair's points, in order.
        trg_visible: the keypoint ids visible in the target picture (the pair's and any
            other the target's annotation holds).
    """
    visible = set(trg_visible)
    twinned = {s for g in groups if sum(s in visible for s in g) >= 2 for s in g}
    return [s in twinned for s in pair_slots]


def geo_twins(groups: Sequence[Sequence[int]], pair_slots: Sequence[int], trg_points: Mapping[int, Sequence[float]]) -> list[list[list[float]]]:
    """For each of a pair's points, where its twins are in the target picture: the [x, y] of
    the other members of its group of mirrored keypoints that ``trg_points`` (keypoint id ->
    [x, y], every keypoint the target shows) holds; empty for a point with none (exactly the
    points that are not geometry-aware)."""
    group_of = {s: g for g in groups for s in g}
    return [[list(map(float, trg_points[t])) for t in group_of.get(s, ()) if t != s and t in trg_points] for s in pair_slots]


def keypoint_ids(record: PairRecord) -> list[str] | None:
    """Which keypoint of its category each of a pair's points is, as the dataset numbers them
    (SPair-71k's and MP-100's ``kps_ids``, AP-10K's index into its 17 keypoints, CUB's part
    id of ``parts.txt``), as text; None where the records do not say (PF-Pascal and
    PF-Willow keep annotation order only, your own pairs unless ``meta.kps_ids`` is given)."""
    ids = record.meta.get("kps_ids", record.meta.get("part_ids"))
    if not isinstance(ids, list) or len(ids) != record.n_points:
        return None
    return [str(i) for i in ids]


def geo_aware_mask(record: PairRecord, where: str = "<record>") -> np.ndarray:
    """A pair's ``meta["geo_aware"]`` as a bool array, one per keypoint (``records.geo_aware_points``)."""
    mask = record.meta["geo_aware"]
    if not isinstance(mask, list) or len(mask) != record.n_points or not all(isinstance(v, bool) for v in mask):
        raise DataError(where, f"pair {record.id!r}: meta.geo_aware must be a list of {record.n_points} true/false values, one per keypoint")
    return np.asarray(mask, dtype=bool)


def geo_twins_points(record: PairRecord, where: str = "<record>") -> list[np.ndarray]:
    """A pair's ``meta["geo_twins"]`` as one (K, 2) array per keypoint (``records.geo_twins``)."""
    twins = record.meta["geo_twins"]
    if not isinstance(twins, list) or len(twins) != record.n_points or not all(isinstance(t, list) for t in twins):
        raise DataError(where, f"pair {record.id!r}: meta.geo_twins must be a list of {record.n_points} lists of [x, y], one per keypoint")
    return [as_points(t, where, f"meta.geo_twins[{i}]") if t else np.zeros((0, 2)) for i, t in enumerate(twins)]


def coco_keypoints(values, where: str) -> np.ndarray:
    """COCO ``keypoints`` [x1, y1, v1, x2, ...] as an (N, 3) float64 array."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(where, "keypoints is not a list of numbers") from None
    if arr.ndim != 1 or arr.size % 3:
        raise DataError(where, f"keypoints has {arr.size} values, not a multiple of 3 (x, y, v)")
    arr = arr.reshape(-1, 3)
    if not np.isfinite(arr).all():
        raise DataError(where, "keypoints holds a value that is not finite")
    return arr


def xywh_box(values, where: str) -> tuple[float, float, float, float]:
    """A COCO ``bbox`` [x, y, w, h] as [x1, y1, x2, y2]."""
    try:
        x, y, w, h = (float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(where, f"bbox is {values!r}, expected [x, y, w, h]") from None
    if w < 0 or h < 0:
        raise DataError(where, f"bbox is {values!r}: negative width or height")
    return x, y, x + w, y + h


def pck_bases(
    rule: BaseRule,
    trg_size: Sequence[int],
    trg_kps: np.ndarray,
    trg_bbox: Sequence[float] | None,
    resolution: int = SD4MATCH_RESOLUTION,
) -> dict[str, float]:
    """Threshold base ``b`` of PCK under both protocols.

    Args:
        rule: ``bbox`` (SPair-71k: max side of the target box), ``image`` (PF-Pascal:
            max side of the target image) or ``kps`` (PF-Willow: max extent of the
            target keypoints).
        trg_size: target image (W, H).
        trg_kps: target keypoints (N, 2), original pixels.
        trg_bbox: target box [x1, y1, x2, y2] or None.
        resolution: side of the square sd4match frame.

    Returns:
        ``{"standard": b, "sd4match": b'}`` where ``b'`` is measured in the square frame
        (x scaled by R/W, y by R/H) from unclamped points.
    """
    w, h = float(trg_size[0]), float(trg_size[1])
    sx, sy = resolution / w, resolution / h
    if rule == "bbox":
        if trg_bbox is None:
            raise ValueError("the bbox rule needs a target box")
        bw, bh = trg_bbox[2] - trg_bbox[0], trg_bbox[3] - trg_bbox[1]
        return {"standard": float(max(bw, bh)), "sd4match": float(max(bw * sx, bh * sy))}
    if rule == "image":
        return {"standard": float(max(w, h)), "sd4match": float(resolution)}
    if rule == "kps":
        if len(trg_kps) == 0:
            return {"standard": 0.0, "sd4match": 0.0}
        ext = trg_kps.max(axis=0) - trg_kps.min(axis=0)
        return {"standard": float(max(ext[0], ext[1])), "sd4match": float(max(ext[0] * sx, ext[1] * sy))}
    raise ValueError(f"unknown PCK base rule {rule!r}; expected bbox, image or kps")


#: what each PCK base rule measures, as tables name it
BASE_WORDS = {"bbox": "max side of the target box", "image": "max side of the target image", "kps": "max extent of the target keypoints"}


def rebased(records: Sequence["PairRecord"], rule: BaseRule, dataset: str = "this dataset") -> list["PairRecord"]:
    """``records`` with the PCK threshold base of ``rule`` (``pck_bases``) instead of their
    dataset's own, to compare with a table that thresholds another way; a pair without a
    target box under ``bbox`` is a ``DataError`` naming it."""
    if rule not in BASE_WORDS:
        raise ValueError(f"unknown PCK base rule {rule!r}; expected {', '.join(BASE_WORDS)}")
    out = []
    for r in records:
        if rule == "bbox" and r.trg_bbox is None:
            raise DataError(f"pair {r.id}", f"has no target box, so PCK cannot be based on one on {dataset} (use image or kps)")
        base = pck_bases(rule, r.trg_size, r.trg_kps, r.trg_bbox)
        if r.n_points and not base["standard"] > 0:
            raise DataError(f"pair {r.id}", f"its target keypoints span nothing ({r.n_points} at one place), so no threshold can be based on "
                                            "their extent (use bbox or image)")
        out.append(replace(r, pck_base=base))
    return out


@dataclass(frozen=True)
class PairRecord:
    """One annotated image pair.

    Attributes:
        id: pair id (SPair-71k: annotation stem; PF datasets: 0-based row in the pair list).
        category: object category.
        src, trg: image paths relative to the dataset root, with ``/`` separators.
        src_size, trg_size: (W, H) in pixels.
        src_kps, trg_kps: (N, 2) float64 arrays of (x, y) in original pixels, row i of
            one corresponding to row i of the other.
        src_bbox, trg_bbox: [x1, y1, x2, y2] or None.
        pck_base: ``{"standard": b, "sd4match": b}``.
        meta: dataset-specific fields (SPair difficulty levels, PF-Pascal ``flip``, ...).
    """

    id: str
    category: str
    src: str
    trg: str
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: tuple[float, float, float, float] | None
    trg_bbox: tuple[float, float, float, float] | None
    pck_base: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_points(self) -> int:
        return int(self.src_kps.shape[0])

    @property
    def files(self) -> tuple[str, ...]:
        """The picture files the pair reads: the source alone for a synthetic pair (its
        target is rendered from the source), else the source and the target."""
        return (self.src,) if "synthetic" in self.meta else (self.src, self.trg)

    def to_json(self) -> dict[str, Any]:
        """The pair-export dict (DESIGN.md, JSON Lines format)."""
        return {
            "id": self.id,
            "category": self.category,
            "src": self.src,
            "trg": self.trg,
            "src_size": list(self.src_size),
            "trg_size": list(self.trg_size),
            "src_kps": _plain(self.src_kps),
            "trg_kps": _plain(self.trg_kps),
            "src_bbox": None if self.src_bbox is None else _plain(self.src_bbox),
            "trg_bbox": None if self.trg_bbox is None else _plain(self.trg_bbox),
            "pck_base": dict(self.pck_base),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "<record>") -> "PairRecord":
        if not isinstance(d, dict):
            raise DataError(where, f"expected a pair record (a JSON object), not a {type(d).__name__}")
        missing = [k for k in ("id", "category", "src", "trg", "src_size", "trg_size", "src_kps", "trg_kps", "pck_base") if k not in d]
        if missing:
            raise DataError(where, f"missing key {missing[0]!r}")
        return cls(
            id=str(d["id"]),
            category=str(d["category"]),
            src=d["src"],
            trg=d["trg"],
            src_size=tuple(int(v) for v in d["src_size"]),
            trg_size=tuple(int(v) for v in d["trg_size"]),
            src_kps=as_points(d["src_kps"], where, "src_kps"),
            trg_kps=as_points(d["trg_kps"], where, "trg_kps"),
            src_bbox=None if d.get("src_bbox") is None else tuple(float(v) for v in d["src_bbox"]),
            trg_bbox=None if d.get("trg_bbox") is None else tuple(float(v) for v in d["trg_bbox"]),
            pck_base={k: float(v) for k, v in d["pck_base"].items()},
            meta=dict(d.get("meta") or {}),
        )

    def mirrored(self) -> "PairRecord":
        """Both images mirrored left-right: x -> W - x for points and boxes.

        The convention of the field's PF-Pascal training code (boxes swap x1/x2).
        Keypoint order is kept: both images are mirrored, so row i still matches row i.
        Loading images of the returned record (``sd4match.data.load_pair_images``)
        mirrors the pixels too.
        """

        def flip_pts(p: np.ndarray, w: int) -> np.ndarray:
            q = p.copy()
            q[:, 0] = w - q[:, 0]
            return q

        def flip_box(b, w):
            return None if b is None else (w - b[2], b[1], w - b[0], b[3])

        meta = dict(self.meta)
        meta["mirrored"] = not bool(meta.get("mirrored", False))
        return replace(
            self,
            src_kps=flip_pts(self.src_kps, self.src_size[0]),
            trg_kps=flip_pts(self.trg_kps, self.trg_size[0]),
            src_bbox=flip_box(self.src_bbox, self.src_size[0]),
            trg_bbox=flip_box(self.trg_bbox, self.trg_size[0]),
            meta=meta,
        )


def _plain(values: Iterable) -> Any:
    """Numbers as JSON-friendly Python values: ints stay ints, floats keep full precision."""
    arr = np.asarray(values)
    out = arr.tolist()

    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, float) and v.is_integer() and math.isfinite(v):
            return int(v)
        return v

    return fix(out)


def write_jsonl(records: Iterable[PairRecord], fh) -> int:
    n = 0
    for r in records:
        fh.write(json.dumps(r.to_json()) + "\n")
        n += 1
    return n


def read_jsonl(path: str | Path) -> list[PairRecord]:
    return [PairRecord.from_json(d, where) for where, d in json_lines(path, DataError)]


#: how ``--limit N`` picks its pairs (recorded with every limited run, so runs of another rule never mix)
LIMIT_RULE = "category-share"


def limit_record(n: int, key: str = "limit_pairs") -> dict:
    """What a run of ``limit_pairs(..., n)`` records of the rule that picked its pairs, under
    ``key`` (nothing when it takes every pair)."""
    return {key: LIMIT_RULE} if n else {}


def limit_rule_changed(diff, key: str = "limit_pairs", flag: str = "--limit") -> str:
    """For a refusal whose differing settings (``diff``: names, dotted or not) include ``key``:
    why, to add to its line (a limited run of an earlier sd4match records no rule); else ""."""
    if any(d.rpartition(".")[2] == key for d in diff):
        return f": an earlier sd4match's {flag} took the first N pairs, this one takes each category's share"
    return ""


def select_pairs(records: Sequence[PairRecord], *, limit: int = 0, categories: Sequence[str] = (), where: str | Path = "--categories") -> list[PairRecord]:
    """The pairs an evaluation reads: those of ``categories`` (every pair when empty; a name
    the records lack is one line naming those they have), then ``limit_pairs(..., limit)``."""
    if categories:
        known = sorted({r.category for r in records})
        missing = [c for c in categories if c not in known]
        if missing:
            raise DataError(where, f"category {missing[0]!r} has no pair here; the categories are {', '.join(known)}")
        keep = set(categories)
        records = [r for r in records if r.category in keep]
    return limit_pairs(records, limit)


def limit_pairs(records: Sequence[PairRecord], n: int) -> list[PairRecord]:
    """``n`` of ``records`` for a quick look that covers every category: each category gets its
    share of the ``n`` (at least one when ``n`` allows every category one; the rest in
    proportion to its pairs, largest remainders first), taken from its first pairs (which
    share pictures, so few features are extracted), kept in the split's order.

    The first ``n`` pairs of a split sorted by category (SPair-71k, PF-Willow) would hold one
    or two categories only. ``n`` of 0, or at least the split's size, keeps every pair.
    """
    if not n or n >= len(records):
        return list(records)
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_cat.setdefault(r.category, []).append(i)
    cats = list(by_cat)
    floor_each = 1 if n >= len(cats) else 0
    weights = [len(by_cat[c]) - floor_each for c in cats]
    left, total = n - floor_each * len(cats), sum(weights)
    quotas = [left * w / total if total else 0.0 for w in weights]
    take = [floor_each + math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(cats)), key=lambda j: (-(quotas[j] - math.floor(quotas[j])), j))
    for j in by_remainder[: n - sum(take)]:
        take[j] += 1
    chosen = sorted(i for c, k in zip(cats, take) for i in by_cat[c][:k])
    return [records[i] for i in chosen]
