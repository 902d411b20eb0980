"""COCO keypoints files as annotation tools export them (CVAT, Label Studio, a corrected
``transfer`` ``coco.json``): read into instances, and turned into your own pair lists.

``prepare_custom`` makes ``--dataset custom`` pair lists of an annotated folder: the pictures
split into trn / val / test (seeded, each category's pictures apart, so a test pair's two
pictures were never trained on), and within a split every two instances of a category a
pair, their points those labelled in both.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd4match.data.custom import CustomPairs
from sd4match.data.records import coco_keypoints
from sd4match.errors import DataError, Sd4MatchError
from sd4match.fileio import atomic_write_text, read_user_text


@dataclass(frozen=True)
class CocoInstance:
    """One annotation of a keypoint category: its picture (``file_name``, as the file gives
    it), its category, the category's keypoint names and its points, (K, 3) x, y, v."""

    id: str
    image_id: object
    file_name: str
    category: str
    names: tuple[str, ...]
    points: np.ndarray
    bbox: tuple[float, float, float, float] | None  # [x1, y1, x2, y2], when the annotation has a box of some size

    @property
    def labelled(self) -> np.ndarray:
        """Which points are labelled (COCO's v > 0)."""
        return self.points[:, 2] > 0


def read_coco_keypoints(path: str | Path) -> list[CocoInstance]:
    """Every annotation of a COCO file whose category has ``keypoints``, in file order; the
    boxes or outlines of categories without keypoints are passed over. A file that is no
    COCO keypoints file, an annotation of an unknown image or category, or one with another
    number of points than its category names, is one ``DataError`` naming the file."""
    path = Path(path)
    try:
        d = json.loads(read_user_text(path, DataError))
        files = {im["id"]: str(im["file_name"]).replace("\\", "/") for im in d["images"]}  # a Windows tool's a\b.jpg is a/b.jpg
        cats = {c["id"]: (str(c.get("name", c["id"])), tuple(str(n) for n in c.get("keypoints") or ())) for c in d["categories"]}
        annotations = list(d["annotations"])
        twice = {cid for cid, (_, names) in cats.items() if len(set(names)) != len(names)}  # categories naming a keypoint twice
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise DataError(path, f"not a COCO keypoints file (images, annotations and categories with keypoints; no {e})") from None
    out = []
    for k, a in enumerate(annotations):
        where = f"{path}: annotation {a.get('id', k) if isinstance(a, dict) else k}"
        try:
            known = isinstance(a, dict) and a.get("category_id") in cats and a.get("image_id") in files
        except TypeError:  # an id that is a list or an object
            known = False
        if not known:
            raise Sd4MatchError(f"{where}: its category_id or image_id is not in the file's categories or images")
        category, names = cats[a["category_id"]]
        if not names or not a.get("keypoints"):  # a box or outline (of a category without keypoints, or not yet annotated): no points
            continue
        points = coco_keypoints(a["keypoints"], where)
        if len(points) != len(names):
            raise Sd4MatchError(f"{where}: {len(points)} keypoints, but its category names {len(names)}")
        if a["category_id"] in twice:
            raise Sd4MatchError(f"{where}: its category names a keypoint twice; each point is told apart by its name")
        out.append(CocoInstance(str(a.get("id", k)), a["image_id"], files[a["image_id"]], category, names, points, _box(a.get("bbox"))))
    return out


def picture_of(instance: CocoInstance, images: str | Path, coco: str | Path) -> Path:
    """The picture of ``instance``: its ``file_name`` under ``images``; a missing one named."""
    picture = Path(images) / instance.file_name
    if not picture.is_file():
        raise Sd4MatchError(f"{picture}: missing (annotated in {coco}; pictures are looked up under {images})")
    return picture


def _box(value) -> tuple[float, float, float, float] | None:
    """A COCO ``bbox`` [x, y, w, h] as [x1, y1, x2, y2]; None when absent or of no size."""
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (x, y, x + w, y + h) if w > 0 and h > 0 and all(np.isfinite((x, y, w, h))) else None


SPLITS = ("trn", "val", "test")


def _path_from(root: Path, picture: Path) -> str:
    """``picture`` as a pair list in ``root`` names it: relative to ``root`` when it lies under
    ``root``'s parent folder (the two move together), else absolute."""
    pic, base = picture.resolve(), root.resolve()
    try:
        pic.relative_to(base.parent)
    except ValueError:
        return pic.as_posix()
    return Path(os.path.relpath(pic, base)).as_posix()


def prepare_custom(coco: str | Path, images: str | Path, root: str | Path, *, val: float = 0.1, test: float = 0.2, seed: int = 0,
                   min_points: int = 1, boxes: bool = True, max_pairs: int = 0) -> dict[str, dict[str, int]]:
    """Your own annotations as ``--dataset custom`` pair lists: ``root/{trn,val,test}.jsonl``.

    The pictures of each category (a picture goes with its first instance's category) are
    shuffled with ``seed``; ``round(test * n)`` of them are test's, ``round(val * n)`` val's,
    the rest trn's (a share of one picture goes to trn: a pair needs two). Within a split,
    every two instances of a category on different pictures make a pair (in file order, the
    earlier the source) when at least ``min_points`` points are labelled in both (with
    ``max_pairs``, at most that many of a category in a split, drawn with ``seed``, kept in
    that order); its points are those, with their names (the category's ``keypoints``)
    as ``meta.kps_ids`` for results per keypoint, and its boxes the instances' (the PCK base:
    the target box, else the target picture; without ``boxes`` no box is written, so the base
    is the target picture's size: for files whose boxes are the points' tight box). A picture
    beside ``root`` (under its parent folder) is written as a path relative to ``root``, any
    other as an absolute path.

    Returns:
        {split: {"pictures": n, "pairs": n}} for the splits written (those with a pair).
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise Sd4MatchError(f"val {val} and test {test}: each a share in [0, 1), together below 1 (the rest is trn)")
    if min_points < 1 or max_pairs < 0:
        raise Sd4MatchError(f"min_points {min_points}, max_pairs {max_pairs}: a pair needs a point; max_pairs is a count (0: every pair)")
    images, root = Path(images), Path(root)
    held = [s for s in SPLITS if (root / f"{s}.jsonl").exists()]
    if held:
        raise Sd4MatchError(f"{root}: already holds {held[0]}.jsonl; choose an empty --root")
    instances = read_coco_keypoints(coco)
    for inst in instances:
        picture_of(inst, images, coco)
    first_category: dict[str, str] = {}
    for inst in instances:
        first_category.setdefault(inst.file_name, inst.category)
    split_of: dict[str, str] = {}
    rng = random.Random(seed)
    for category in dict.fromkeys(first_category.values()):
        pics = [f for f, c in first_category.items() if c == category]
        rng.shuffle(pics)
        n = len(pics)
        n_test, n_val = (k if k >= 2 else 0 for k in (round(test * n), round(val * n)))
        for i, f in enumerate(pics):
            split_of[f] = "test" if i < n_test else "val" if i < n_test + n_val else "trn"
    groups: dict[tuple[str, str], list[CocoInstance]] = {}  # (split, category) -> its instances, in file order
    for inst in instances:
        groups.setdefault((split_of[inst.file_name], inst.category), []).append(inst)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    pictures: dict[str, set[str]] = {s: set() for s in SPLITS}
    paths = {f: _path_from(root, images / f) for f in first_category}  # each picture once
    for (split, _), group in groups.items():
        chosen = []
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                both = np.nonzero(a.labelled & b.labelled)[0] if a.names == b.names and a.file_name != b.file_name else ()
                if len(both) >= min_points:
                    chosen.append((a, b, both))
        if max_pairs and len(chosen) > max_pairs:
            chosen = [chosen[k] for k in sorted(rng.sample(range(len(chosen)), max_pairs))]
        for a, b, both in chosen:
            pair = {"id": f"{a.id}-{b.id}", "category": a.category, "src": paths[a.file_name], "trg": paths[b.file_name],
                    "src_kps": a.points[both, :2].tolist(), "trg_kps": b.points[both, :2].tolist(),
                    **{f"{side}_bbox": list(inst.bbox) for side, inst in (("src", a), ("trg", b)) if boxes and inst.bbox is not None},
                    "meta": {"kps_ids": [a.names[j] for j in both]}}
            lines[split].append(json.dumps(pair))
            pictures[split] |= {a.file_name, b.file_name}
    written = {s: {"pictures": len(pictures[s]), "pairs": len(lines[s])} for s in SPLITS if lines[s]}
    if not written:
        raise DataError(Path(coco), f"no two instances of one category on different pictures of one split share {min_points} labelled point(s)")
    root.mkdir(parents=True, exist_ok=True)
    for s in written:
        atomic_write_text(root / f"{s}.jsonl", "\n".join(lines[s]) + "\n")
    try:  # read back as --dataset custom reads them: a point outside its picture, or a turned picture, is named now
        for s in written:
            CustomPairs(root).pairs(s)
    except Sd4MatchError:
        for s in written:
            (root / f"{s}.jsonl").unlink(missing_ok=True)
        raise
    return written
