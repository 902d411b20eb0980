"""PCK under named protocols, aggregated per image and per point (DESIGN.md).

A prediction p of target keypoint q is correct at alpha iff ||p - q|| <= alpha * b.

* ``standard``: original target pixels; b from ``record.pck_base["standard"]``.
* ``sd4match``: points mapped into the R x R frame (x * R / W, y * R / H); ground truth
  clamped to [1e-4, R - 1 - 1e-4], predictions not clamped; b from
  ``record.pck_base["sd4match"]`` (measured at R = 768, scaled linearly for another R).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from sd4match.config import DEFAULT_ALPHAS, alpha_values, category_names
from sd4match.data import DATASETS, load_pair_images
from sd4match.data.records import BASE_WORDS, CLAMP_EPS, SD4MATCH_RESOLUTION, PairRecord, check_protocol, geo_aware_mask, geo_twins_points, keypoint_ids
from sd4match.data.spair import DIFFICULTY_KEYS
from sd4match.errors import PredictionError
from sd4match.fileio import atomic_path, atomic_save_image, json_lines
from sd4match.viz import caption, contact_sheet, draw_errors, pyplot


def alpha_key(alpha: float) -> str:
    """How an alpha is written as a JSON key: ``0.1`` -> ``"0.1"``."""
    return f"{float(alpha):g}"


def protocol_frame(
    record: PairRecord,
    pred: np.ndarray,
    protocol: str,
    resolution: int = SD4MATCH_RESOLUTION,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Predicted points, ground-truth points and threshold base in the protocol's frame.

    Shape:
        pred: (N, 2) in original target pixels. Returns (N, 2), (N, 2), scalar.
    """
    check_protocol(protocol)
    if protocol == "standard":
        return np.asarray(pred, dtype=np.float64), record.trg_kps, record.pck_base["standard"]
    base = record.pck_base["sd4match"] * resolution / SD4MATCH_RESOLUTION
    return np.asarray(pred, dtype=np.float64) * _frame_scale(record, resolution), truth_in_frame(record.trg_kps, record, protocol, resolution), base


def _frame_scale(record: PairRecord, resolution: int) -> np.ndarray:
    w, h = record.trg_size
    return np.array([resolution / w, resolution / h])


def truth_in_frame(points: np.ndarray, record: PairRecord, protocol: str, resolution: int = SD4MATCH_RESOLUTION) -> np.ndarray:
    """Annotated target points (original pixels) in the protocol's frame, as ground truth is
    (``sd4match``: squashed to the square frame and clamped into it)."""
    if protocol == "standard":
        return np.asarray(points, dtype=np.float64)
    return np.clip(np.asarray(points, dtype=np.float64) * _frame_scale(record, resolution), CLAMP_EPS, resolution - 1 - CLAMP_EPS)


def twin_swaps(record: PairRecord, pred_f: np.ndarray, base: float, correct: np.ndarray, alphas: Sequence[float], protocol: str,
               resolution: int = SD4MATCH_RESOLUTION) -> np.ndarray:
    """(N, A): which predictions took a twin for the point, at each alpha: wrong, but within
    α·b of one of the point's mirrored twins in the target (``meta["geo_twins"]``), all in the
    protocol's frame (``pred_f``, ``base``, ``correct`` as ``protocol_frame`` and
    ``pck_correct`` give them)."""
    near = np.full(len(pred_f), np.inf)
    for i, twins in enumerate(geo_twins_points(record)):
        if len(twins):
            near[i] = np.linalg.norm(truth_in_frame(twins, record, protocol, resolution) - pred_f[i], axis=-1).min()
    return ~correct & (near[:, None] <= np.asarray(alphas, dtype=np.float64)[None, :] * base)


def pck_correct(pred: np.ndarray, gt: np.ndarray, base: float, alphas: Sequence[float]) -> np.ndarray:
    """Which predictions are correct at each alpha.

    Shape:
        pred, gt: (N, 2). Returns bool (N, A).
    """
    dist = np.linalg.norm(np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64), axis=-1)
    return dist[:, None] <= np.asarray(alphas, dtype=np.float64)[None, :] * base


#: the usual ways predictions end up in other coordinates than the target's original pixels:
#: (how they read, how to convert them, the conversion) for ``frame_hint``
FRAME_MISTAKES = (
    ("coordinates in the 768 x 768 frame (the official code's)", "multiply x by W/768 and y by H/768", lambda p, wh: p * wh / SD4MATCH_RESOLUTION),
    ("(y, x) pairs", "swap the two coordinates", lambda p, wh: p[:, ::-1]),
    ("fractions of the picture (0 to 1)", "multiply them by (W, H)", lambda p, wh: p * wh),
    ("grid coordinates (-1 to 1)", "take (p + 1) / 2 x (W, H)", lambda p, wh: (p + 1) / 2 * wh),
)


def frame_hint(records: Sequence[PairRecord], predictions: Mapping[str, np.ndarray], *, alpha: float = 0.1) -> str | None:
    """A line when ``predictions`` look as if they were not (x, y) in the target pictures'
    original pixels: when one of ``FRAME_MISTAKES`` read back gives a PCK@``alpha`` (per point,
    standard protocol) at least 25 points and twice above the predictions as given, it is
    named with its conversion; else when a quarter or more of the points lie outside their
    pictures (by more than a pixel). None when nothing looks wrong. Nothing is converted:
    the scores stay those of the predictions as given."""
    pairs = [(r, np.asarray(predictions[r.id], dtype=np.float64)) for r in records if r.n_points and r.id in predictions]
    pairs = [(r, p) for r, p in pairs if p.shape == (r.n_points, 2)]
    if not pairs:
        return None
    pred = np.concatenate([p for _, p in pairs])
    gt = np.concatenate([r.trg_kps for r, _ in pairs])
    wh = np.concatenate([np.repeat([r.trg_size], r.n_points, axis=0) for r, _ in pairs]).astype(np.float64)
    base = np.concatenate([np.full(r.n_points, r.pck_base["standard"]) for r, _ in pairs])

    def pck(p):
        return float(pck_correct(p, gt, base[:, None], [alpha]).mean())  # each point its own pair's base

    given = pck(pred)
    read, how, better = max(((read, how, pck(convert(pred, wh))) for read, how, convert in FRAME_MISTAKES), key=lambda t: t[2])
    if better >= given + 0.25 and better >= 2 * given:
        return (f"the predictions score PCK@{alpha:g} {100 * given:.1f} as given but {100 * better:.1f} if they are {read}: sd4match reads "
                f"(x, y) in the target picture's original pixels; if so, {how} (the scores are of the predictions as given)")
    outside = float(np.mean(((pred < -1) | (pred > wh + 1)).any(axis=1)))
    if outside >= 0.25:
        return (f"{100 * outside:.0f}% of the predicted points lie outside their target pictures: predictions are (x, y) in the target "
                "picture's original pixels")
    return None


def prediction_array(kps, pid: str, where: str) -> np.ndarray:
    """One pair's predicted points as an (N, 2) float64 array of finite numbers (a list of
    [x, y], an array or a tensor), or a ``PredictionError`` naming the pair and the point."""
    if hasattr(kps, "detach"):  # a torch tensor, on any device
        kps = kps.detach().cpu().numpy()
    try:
        arr = np.asarray(kps, dtype=np.float64)
    except (TypeError, ValueError):
        raise PredictionError(where, f"pair {pid!r}: kps is not a list of [x, y] numbers") from None
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise PredictionError(where, f"pair {pid!r}: kps has shape {list(arr.shape)}, expected [N, 2]")
    if not np.isfinite(arr).all():
        i = int(np.nonzero(~np.isfinite(arr).all(axis=1))[0][0])
        shown = kps[i] if isinstance(kps, list) else arr[i].tolist()
        raise PredictionError(where, f"pair {pid!r}: point {i} is {shown}, not a finite coordinate")
    return arr


def _predictions(records: Sequence[PairRecord], predictions, where: str) -> dict[str, np.ndarray]:
    """``score``'s predictions as {pair id: (N, 2) array}: a mapping (ids as the records
    write them, so 7 and "7" are one pair) or a sequence with one entry per record, in order."""
    if isinstance(predictions, Mapping):
        items = [(str(k), v) for k, v in predictions.items()]
        named: set[str] = set()
        for pid, _ in items:
            if pid in named:
                raise PredictionError(where, f"pair {pid!r} is predicted twice (under two keys that name the same id)")
            named.add(pid)
    elif isinstance(predictions, (list, tuple)):
        if len(predictions) != len(records):
            raise PredictionError(where, f"{len(predictions)} predictions for {len(records)} pairs (a list is read in the pairs' order: one each)")
        items = [(r.id, v) for r, v in zip(records, predictions)]
    else:
        raise PredictionError(where, f"expected a mapping of pair id to points, or a list in the pairs' order, not a {type(predictions).__name__}")
    return {pid: v if v is None else prediction_array(v, pid, where) for pid, v in items}


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Read a predictions file: JSON Lines ``{"id": ..., "kps": [[x, y], ...]}``."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(path, "predictions file is missing")
    out: dict[str, np.ndarray] = {}
    for where, d in json_lines(path, PredictionError):
        if not isinstance(d, dict) or "id" not in d or "kps" not in d:
            raise PredictionError(where, 'expected an object with "id" and "kps"')
        pid = str(d["id"])
        if pid in out:
            raise PredictionError(where, f"pair {pid!r} is predicted twice")
        out[pid] = prediction_array(d["kps"], pid, where)
    return out


def write_predictions(path: str | Path, predictions: Iterable[tuple[str, np.ndarray]]) -> Path:
    """Write predictions as JSON Lines (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for pid, kps in predictions:
            fh.write(json.dumps({"id": str(pid), "kps": np.asarray(kps, dtype=np.float64).tolist()}) + "\n")
    return path


class _Tally:
    """Running sums for one group: per-image PCK sum / count and pooled point counts."""

    def __init__(self, n_alphas: int):
        self.img_sum = np.zeros(n_alphas)
        self.n_img = 0
        self.pt_hits = np.zeros(n_alphas)
        self.n_pt = 0

    def add(self, correct: np.ndarray) -> None:
        if len(correct) == 0:
            return
        self.img_sum += correct.mean(axis=0)
        self.n_img += 1
        self.pt_hits += correct.sum(axis=0)
        self.n_pt += len(correct)

    def per_image(self, keys: list[str]) -> dict[str, float]:
        return {k: float(v / self.n_img) if self.n_img else math.nan for k, v in zip(keys, self.img_sum)}

    def per_point(self, keys: list[str]) -> dict[str, float]:
        return {k: float(v / self.n_pt) if self.n_pt else math.nan for k, v in zip(keys, self.pt_hits)}


def score(
    records: Sequence[PairRecord],
    predictions: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    *,
    protocol: str = "standard",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    allow_missing: bool = False,
    resolution: int = SD4MATCH_RESOLUTION,
    where: str = "predictions",
    per_pair: bool = False,
) -> dict:
    """PCK of ``predictions`` on ``records``, per image and per point.

    Args:
        records: the pairs of one split.
        predictions: pair id -> (N, 2) predicted target points in original pixels, one per
            source keypoint, in annotation order (arrays, tensors or lists of [x, y]; ids as
            strings or numbers); or a list of them, one per record in order.
        protocol: ``standard`` or ``sd4match``.
        alphas: thresholds.
        allow_missing: score a pair without a prediction as 0 instead of failing.
        resolution: side of the sd4match frame.
        where: name of the predictions source, for error messages.
        per_pair: also ``"per_pair"``: pair id -> its PCK at each alpha (the fraction of its
            points correct), for each pair with keypoints (confidence intervals, paired tests).

    Returns:
        ``{"protocol", "alphas", "n_pairs", "n_points", "n_categories", "n_pairs_by_category",
        "per_image": {"all", "by_category", "category_mean" [, "by_difficulty"]}, "per_point":
        {...}}``; alpha keys as strings (``"0.1"``). ``category_mean`` is the mean over the ``n_categories``
        categories with a scored pair of their PCK, each category counting once (the
        aggregation of tables that average per category). Pairs without keypoints count in
        ``n_pairs`` but not in the PCK means. Where every pair names its keypoints
        (``records.keypoint_ids``), ``"by_keypoint"``: category -> keypoint id ->
        ``{"n_points", alpha: PCK per point}`` (that keypoint's points pooled over the
        category's pairs).
    """
    check_protocol(protocol)
    predictions = _predictions(records, predictions, where)
    alphas = _alphas(alphas)
    keys = [alpha_key(a) for a in alphas]
    ids = {r.id for r in records}
    unknown = [pid for pid in predictions if pid not in ids]
    if unknown:
        raise PredictionError(where, f"pair {unknown[0]!r} is not in the pair list being scored ({len(unknown)} unknown ids)")
    total = _Tally(len(alphas))
    by_cat: dict[str, _Tally] = defaultdict(lambda: _Tally(len(alphas)))
    by_diff: dict[str, dict[str, _Tally]] = defaultdict(lambda: defaultdict(lambda: _Tally(len(alphas))))
    by_group: dict[str, dict[str, _Tally]] = defaultdict(lambda: defaultdict(lambda: _Tally(len(alphas))))
    geo, geo_by_cat, swaps = _Tally(len(alphas)), defaultdict(lambda: _Tally(len(alphas))), _Tally(len(alphas))
    by_kp: dict[str, list[tuple[list[str], np.ndarray]]] = defaultdict(list)
    n_points = n_missing = n_geo_known = n_twins_known = n_kp_known = 0
    pairs: dict[str, list[float]] = {}
    for r in records:
        pred = predictions.get(r.id)
        if pred is None:
            if not allow_missing:
                raise PredictionError(where, f"no prediction for pair {r.id!r} (use --allow-missing to score it as 0)")
            correct = np.zeros((r.n_points, len(alphas)), dtype=bool)
            swapped = correct
            n_missing += 1
        else:
            if pred.shape != r.trg_kps.shape:
                raise PredictionError(where, f"pair {r.id!r}: {len(pred)} predicted points for {r.n_points} source keypoints")
            p, g, b = protocol_frame(r, pred, protocol, resolution)
            correct = pck_correct(p, g, b, alphas)
            swapped = twin_swaps(r, p, b, correct, alphas, protocol, resolution) if "geo_twins" in r.meta else None
        n_points += r.n_points
        if per_pair and r.n_points:
            pairs[r.id] = correct.mean(axis=0).tolist()
        total.add(correct)
        by_cat[r.category].add(correct)
        for k in DIFFICULTY_KEYS:
            if k in r.meta:
                by_diff[k][str(r.meta[k])].add(correct)
        kp = keypoint_ids(r)
        if kp is not None:  # each point pooled with the same keypoint of its category (below)
            n_kp_known += 1
            by_kp[r.category].append((kp, correct))
        for g, value in (r.meta.get("groups") or {}).items():  # AP-10K: species, family; MP-100: domain
            by_group[g][str(value)].add(correct)
        if "geo_aware" in r.meta:  # SPair-71k, AP-10K: the points a mirrored twin could take
            twinned = geo_aware_mask(r)
            geo.add(correct[twinned])
            geo_by_cat[r.category].add(correct[twinned])
            n_geo_known += 1
            if "geo_twins" in r.meta:
                swaps.add(swapped[twinned])
                n_twins_known += 1
    out = {
        "protocol": protocol,
        "alphas": alphas,
        "n_pairs": len(records),
        "n_points": n_points,
        "per_image": {"all": total.per_image(keys), "by_category": {c: t.per_image(keys) for c, t in sorted(by_cat.items())}},
        "per_point": {"all": total.per_point(keys), "by_category": {c: t.per_point(keys) for c, t in sorted(by_cat.items())}},
    }
    scored = [c for c, t in sorted(by_cat.items()) if t.n_img]  # categories with at least one scored pair
    out["n_categories"] = len(scored)
    out["n_pairs_by_category"] = {c: n for c, n in sorted(Counter(r.category for r in records).items())}
    for agg in ("per_image", "per_point"):
        out[agg]["category_mean"] = category_mean(out[agg]["by_category"], scored, keys)
    if allow_missing:
        out["n_missing"] = n_missing  # pairs without a prediction, scored 0
    if per_pair:
        out["per_pair"] = pairs
    if protocol == "sd4match" and resolution != SD4MATCH_RESOLUTION:
        out["resolution"] = resolution
    for g, values in by_group.items():
        for agg, fn in (("per_image", _Tally.per_image), ("per_point", _Tally.per_point)):
            out[agg][f"by_{g}"] = {v: fn(t, keys) for v, t in sorted(values.items())}
    if records and n_geo_known == len(records):  # a subset only where every pair names its points
        out["geo_aware"] = {"n_pairs": geo.n_img, "n_points": geo.n_pt}
        for agg, fn in (("per_image", _Tally.per_image), ("per_point", _Tally.per_point)):
            out[agg]["geo_aware"] = {"all": fn(geo, keys), "by_category": {c: fn(t, keys) for c, t in sorted(geo_by_cat.items()) if t.n_img}}
            if n_twins_known == len(records):  # wrong, but on a mirrored twin: the left-right confusion itself
                out[agg]["geo_aware"]["twin_swaps"] = fn(swaps, keys)
    if records and n_kp_known == len(records):
        out["by_keypoint"] = {c: _pool_keypoints(rows, keys) for c, rows in sorted(by_kp.items())}
    if by_diff:
        for agg, fn in (("per_image", _Tally.per_image), ("per_point", _Tally.per_point)):
            out[agg]["by_difficulty"] = {
                k: {lvl: fn(t, keys) for lvl, t in sorted(levels.items(), key=lambda kv: int(kv[0]))} for k, levels in by_diff.items()
            }
    return out


def _alphas(alphas: float | Sequence[float]) -> list[float]:
    """``config.alpha_values`` of a sequence of thresholds, or of one number."""
    return list(alpha_values([alphas] if isinstance(alphas, (int, float, str)) else list(alphas), alphas))


def _pool_keypoints(rows: Sequence[tuple[list[str], np.ndarray]], keys: list[str]) -> dict[str, dict]:
    """One category's pairs (each point's keypoint id, its (N, alphas) verdicts) as keypoint
    id -> ``{"n_points", alpha: share correct}``, ids in ``_id_order``."""
    ids = [k for kp, _ in rows for k in kp]
    if not ids:
        return {}
    names, which = np.unique(np.asarray(ids), return_inverse=True)
    hits = np.zeros((len(names), len(keys)))
    np.add.at(hits, which, np.concatenate([c for _, c in rows]).astype(float))
    counts = np.bincount(which, minlength=len(names))
    order = sorted(range(len(names)), key=lambda j: _id_order(str(names[j])))
    return {str(names[j]): {"n_points": int(counts[j]), **{k: float(hits[j, a] / counts[j]) for a, k in enumerate(keys)}} for j in order}


def _id_order(k: str) -> tuple:
    """Keypoint ids in their numeric order where they are numbers (2 before 10), others after by name."""
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


def keypoint_names(result: dict, dataset: str) -> dict[str, str]:
    """The names of the keypoint ids ``result["by_keypoint"]`` holds, where ``dataset``
    names its keypoints (AP-10K, CUB); empty otherwise."""
    names = DATASETS[dataset].keypoint_names if dataset in DATASETS else {}
    seen = {k for kps in result.get("by_keypoint", {}).values() for k in kps}
    return {k: names[k] for k in sorted(seen, key=_id_order) if k in names}


def label_score(result: dict, dataset: str, split: str, categories: Sequence[str] = ()) -> dict:
    """``result`` (a ``score``) named with what it scored, as ``score.json`` holds it: the
    dataset and split, the categories when some were chosen, and the names of its keypoint
    ids where the dataset has them (``keypoint_names``)."""
    result["dataset"], result["split"] = dataset, split
    if categories:
        result["categories"] = list(categories)
    if names := keypoint_names(result, dataset):
        result["keypoint_names"] = names
    return result


def keypoint_table(result: dict, title: str = "") -> str:
    """``score``'s ``by_keypoint`` as text: per category, each keypoint id (and its name,
    ``result["keypoint_names"]``) with its points and its PCK per point (its points pooled
    over the category's pairs)."""
    keys = [alpha_key(a) for a in result["alphas"]]
    lines = [f"PCK per keypoint{(' on ' + title) if title else ''} | protocol: {result['protocol']} | each keypoint's points pooled "
             "over its category's pairs"]
    names = result.get("keypoint_names", {})
    for cat, kps in result["by_keypoint"].items():
        lines += ["", f"[{cat}]", *pck_rows("keypoint", [(f"{k} {names[k]}" if k in names else k, v) for k, v in kps.items()], keys)]
    lines += ["", "values in %"]
    return "\n".join(lines)


def pck_rows(first: str, rows: Sequence[tuple[str, dict]], keys: Sequence[str]) -> list[str]:
    """A PCK table's lines: its header (``first`` names the first column), then one line per
    ``(label, {"n_points": n, alpha key: share correct})``, the shares in %."""
    width = max([10, *(len(label) + 2 for label, _ in rows)])
    head = f"{first:<{width}}{'points':>8}  " + "  ".join(f"{'a=' + k:>7}" for k in keys)
    return [head, *(f"{label:<{width}}{v['n_points']:>8}  " + "  ".join(f"{100 * v[k]:7.2f}" for k in keys) for label, v in rows)]


def geo_aware_all(doc: dict) -> dict[str, dict[str, float]]:
    """A score's geometry-aware PCK over all its pairs, ``{"per_image": ..., "per_point": ...}``,
    and the share of those points taken for a twin per point (``"twin_swaps"``, where the
    score has it); empty where the score has no such subset."""
    out = {agg: doc[agg]["geo_aware"]["all"] for agg in ("per_image", "per_point") if "geo_aware" in doc[agg]}
    if "twin_swaps" in doc["per_point"].get("geo_aware", {}):
        out["twin_swaps"] = doc["per_point"]["geo_aware"]["twin_swaps"]
    return out


def geo_aware_columns(rows: Sequence[dict], key: str) -> tuple[list[str], list[list[str]]]:
    """Table columns of the geometry-aware PCK@``key`` per image and per point of ``rows``
    (each holding ``geo_aware_all`` under ``"geo_aware"``), and the share on a twin: headers
    and each row's cells; each column only where every row has it."""
    parts = [(f"geo-aware {agg.replace('_', ' ')} @{key}", agg) for agg in ("per_image", "per_point")] + [(f"geo-aware on a twin @{key}", "twin_swaps")]
    shown = [(head, part) for head, part in parts if rows and all(key in r.get("geo_aware", {}).get(part, {}) for r in rows)]
    if not any(part == "per_image" for _, part in shown):
        return [], [[] for _ in rows]
    return [head for head, _ in shown], [[f"{100 * r['geo_aware'][part][key]:.2f}" for _, part in shown] for r in rows]


def pair_details(records: Sequence[PairRecord], predictions: Mapping[str, np.ndarray], *, protocol: str = "standard",
                 alphas: Sequence[float] = DEFAULT_ALPHAS, resolution: int = SD4MATCH_RESOLUTION) -> list[dict]:
    """Each predicted pair with keypoints, as ``score`` scores it: ``{"id", "category",
    "n_points", "pck": {alpha: share correct}, "error": [‖p − q‖ / b per point, in the
    protocol's frame (a point is correct at α when its error ≤ α)], "geo_aware" and
    "keypoints" (each point's keypoint id, ``records.keypoint_ids``; where the pair has them)}``,
    in the records' order."""
    alphas = _alphas(alphas)
    keys = [alpha_key(a) for a in alphas]
    predictions = _predictions(records, predictions, "predictions")
    out = []
    for r in records:
        pred = predictions.get(r.id)
        if pred is None or not r.n_points:
            continue
        if pred.shape != r.trg_kps.shape:
            raise PredictionError("predictions", f"pair {r.id!r}: {len(pred)} predicted points for {r.n_points} source keypoints")
        p, g, b = protocol_frame(r, pred, protocol, resolution)
        correct = pck_correct(p, g, b, alphas)
        row = {"id": r.id, "category": r.category, "n_points": r.n_points, "pck": dict(zip(keys, correct.mean(axis=0).tolist())),
               "error": np.round(np.linalg.norm(p - g, axis=-1) / b, 6).tolist()}
        if "geo_aware" in r.meta:
            row["geo_aware"] = r.meta["geo_aware"]
        if (kp := keypoint_ids(r)) is not None:
            row["keypoints"] = kp
        out.append(row)
    return out


def draw_worst(records: Sequence[PairRecord], predictions: Mapping[str, np.ndarray], root: str | Path, path: str | Path, *, protocol: str = "standard",
               alpha: float = 0.1, count: int = 12, resolution: int = SD4MATCH_RESOLUTION) -> list[str]:
    """``path``: the ``count`` pairs of lowest PCK@``alpha`` (more points first where equal,
    then the list's order), each as ``viz.draw_errors`` draws it, on one sheet. Returns their
    ids, worst first."""
    by_id = {r.id: r for r in records}
    predictions = _predictions(records, predictions, str(path))
    rows = pair_details(records, predictions, protocol=protocol, alphas=(alpha,), resolution=resolution)
    key = alpha_key(alpha)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["pck"][key], -rows[i]["n_points"], i))[:count]
    tiles = []
    for i in order:
        r = by_id[rows[i]["id"]]
        src, trg = load_pair_images(root, r)
        correct = pck_correct(*protocol_frame(r, predictions[r.id], protocol, resolution), [alpha])[:, 0]
        tiles.append((f"{r.id} ({r.category}): {int(correct.sum())}/{r.n_points} within {key}·b",
                      draw_errors(src, trg, r.src_size, r.trg_size, r.src_kps, r.trg_kps, predictions[r.id], correct.tolist())))
    if not tiles:
        raise PredictionError(str(path), "no predicted pair with keypoints to draw")
    sheet = caption(contact_sheet(tiles, tile_height=320, columns=2),
                    f"The {len(tiles)} pairs of lowest PCK@{key} (protocol: {protocol}; b: the pair's threshold base). Left: the source's "
                    "keypoints, numbered in annotation order. Right: each ground-truth point (white ring, its number) joined to its "
                    f"prediction: green within {key}·b, red beyond.")
    atomic_save_image(path, sheet)
    return [rows[i]["id"] for i in order]


def category_mean(by_category: Mapping[str, Mapping[str, float]], categories: Sequence[str], keys: Sequence[str]) -> dict[str, float] | None:
    """The mean over ``categories`` of their per-category PCK (each category counts once);
    None when ``categories`` is empty."""
    if not categories:
        return None
    return {k: float(np.mean([by_category[c][k] for c in categories])) for k in keys}


def seen_unseen(result: dict, seen: Sequence[str]) -> dict:
    """The mean over the categories a prompt was trained on (seen) and over the others
    (unseen) of their per-category PCK, per image and per point: each category counts once.
    A category is seen when one of its names is (``config.category_names``: PF-Willow's
    ``duck(S)`` is seen by a prompt trained on PF-Pascal's ``bird``).

    Returns:
        ``{"seen": [...], "unseen": [...], "per_image": {"seen": {alpha: v} | None, "unseen":
        ...}, "per_point": {...}}`` (None where a group has no category).
    """
    cats, known = list(result["per_image"]["by_category"]), set(seen)
    # PF-Willow's car(G) or duck(S) is seen by a prompt trained on PF-Pascal's car or bird (as a category prompt reads it)
    is_seen = {c: any(n in known for n in category_names(c)) for c in cats}
    groups = {"seen": [c for c in cats if is_seen[c]], "unseen": [c for c in cats if not is_seen[c]]}
    out: dict = {"seen": groups["seen"], "unseen": groups["unseen"]}
    for agg in ("per_image", "per_point"):
        by = result[agg]["by_category"]
        out[agg] = {g: category_mean(by, members, list(result[agg]["all"])) for g, members in groups.items()}
    return out


def format_table(result: dict, title: str = "") -> str:
    """A readable table naming the protocol and the aggregation in its headers."""
    keys = [alpha_key(a) for a in result["alphas"]]
    head = f"PCK{(' on ' + title) if title else ''} | protocol: {result['protocol']}"
    if "resolution" in result:
        head += f" ({result['resolution']} px frame)"
    if "pck_base" in result:
        head += f" | b: {BASE_WORDS[result['pck_base']]} (--pck-base {result['pck_base']})"
    if result.get("categories"):
        head += f" | categories: {', '.join(result['categories'])}"
    head += f" | {result['n_pairs']} pairs, {result['n_points']} points"
    lines = [head]
    if result.get("n_missing"):
        lines.append(f"missing: {result['n_missing']} of the {result['n_pairs']} pairs have no prediction (scored 0)")
    for agg, label in (("per_image", "per image (mean of pair PCK)"), ("per_point", "per point (all points pooled)")):
        block = result[agg]
        rows = [("all", block["all"])]
        if block.get("category_mean") is not None and len(block["by_category"]) > 1:
            rows.append((f"mean of the {result['n_categories']} categories", block["category_mean"]))
        if "geo_aware" in block:
            geo = result["geo_aware"]
            rows.append((f"geo-aware subset ({geo['n_pairs']} pairs, {geo['n_points']} points)", block["geo_aware"]["all"]))
            if "twin_swaps" in block["geo_aware"]:
                rows.append(("  of them on a mirrored twin", block["geo_aware"]["twin_swaps"]))
        rows += list(block["by_category"].items())
        for k, levels in block.get("by_difficulty", {}).items():
            rows += [(f"{k}={lvl}", v) for lvl, v in levels.items()]
        for k in [k for k in block if k.startswith("by_") and k not in ("by_category", "by_difficulty")]:
            rows += [(f"{k[3:]}={v}", vals) for v, vals in block[k].items()]
        su = result.get("seen_unseen")
        if su:
            rows += [(f"mean of {g} categories ({len(su[g])})", su[agg][g]) for g in ("seen", "unseen") if su[agg][g] is not None]
        width = max(12, *(len(name) for name, _ in rows))
        lines.append("")
        lines.append(f"[{label}]")
        lines.append(f"{'':<{width}}  " + "  ".join(f"{'a=' + k:>7}" for k in keys))
        for name, vals in rows:
            lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * vals[k]:7.2f}" for k in keys))
    lines.append("")
    lines.append("values in %")
    return "\n".join(lines)


def plot_categories(result: dict, path: str | Path, title: str = "") -> Path:
    """Per-category per-image PCK as grouped bars (one group per category, one bar per alpha)."""
    plt = pyplot()

    path = Path(path)
    keys = [alpha_key(a) for a in result["alphas"]]
    cats = list(result["per_image"]["by_category"]) + ["all"]
    vals = [result["per_image"]["by_category"].get(c, result["per_image"]["all"]) for c in cats]
    x = np.arange(len(cats))
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cats) + 2), 4))
    for i, k in enumerate(keys):
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [100 * v[k] for v in vals], width, label=f"α={k}")
    counts = {**result.get("n_pairs_by_category", {}), "all": result["n_pairs"]}
    ax.set_xticks(x, [f"{c} ({counts[c]:,})" if c in counts else c for c in cats], rotation=45, ha="right")
    ax.set_xlabel("category (pairs)")
    ax.set_ylabel("PCK per image (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title}, {result['n_pairs']:,} pairs | protocol: {result['protocol']}".strip(" |,"), pad=24)
    # above the bars, outside the axes: inside, it hid the bars of a model near 100 %
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(keys), frameon=False, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix[1:].lower() or "png")
    plt.close(fig)
    return path
