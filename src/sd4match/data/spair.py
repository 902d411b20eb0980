"""SPair-71k (Min et al., 2019) in its official layout.

``root`` is the ``SPair-71k/`` folder::

    JPEGImages/<category>/<image>.jpg
    PairAnnotation/{trn,val,test}/<pair id>.json
    Layout/large/{trn,val,test}.txt
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from sd4match.data.base import PairDataset
from sd4match.data.records import PairRecord, as_points, geo_aware_points, geo_twins, pck_bases, read_json
from sd4match.errors import DataError

PAIR_KEYS = (
    "src_imname", "trg_imname", "src_imsize", "trg_imsize", "src_bndbox", "trg_bndbox",
    "category", "src_kps", "trg_kps",
)
DIFFICULTY_KEYS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
#: keypoint ids (slots) that mirror one another, per category: GeoAware-SC's
#: ``SPAIR_GEO_AWARE`` (its groups of more than one; a bicycle's slots 11 and 12 are unused)
GEO_GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "aeroplane": ((4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),
    "bird": ((1, 2), (10, 11), (12, 13), (14, 15)),
    "boat": ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)),
    "bottle": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
    "bus": ((0, 1), (2, 3, 5, 6), (4, 7), (10, 13, 20, 23), (11, 14, 21, 24), (12, 15, 22, 25), (16, 17, 26, 27), (18, 19, 28, 29)),
    "car": ((0, 1), (2, 3, 6, 7), (4, 8), (5, 9), (10, 13, 20, 23), (11, 14, 21, 24), (12, 15, 22, 25), (16, 17, 26, 27), (18, 19, 28, 29)),
    "cat": ((2, 3), (9, 10, 11, 12)),
    "chair": ((0, 1), (2, 3), (4, 5, 6, 7), (8, 9), (10, 11), (12, 13)),
    "cow": ((2, 3), (9, 10, 11, 12), (15, 16, 17, 18), (19, 20)),
    "dog": ((2, 3), (9, 10, 11, 12)),
    "horse": ((2, 3), (10, 11, 12, 13), (16, 17, 18, 19)),
    "motorbike": ((0, 1), (2, 3)),
    "person": ((8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)),
    "pottedplant": ((0, 1, 2, 3), (4, 5), (6, 8)),
    "sheep": ((2, 3), (9, 10, 11, 12), (15, 16, 17, 18), (19, 20)),
    "train": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)),
    "tvmonitor": ((0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)),
}


class SPair71k(PairDataset):
    name = "spair"
    splits = ("trn", "val", "test")
    base_rule = "bbox"
    required = ("JPEGImages", "PairAnnotation", "Layout")
    geo_source = "the target's ImageAnnotation/<category>/<name>.json"

    def __init__(self, root: str | Path):
        super().__init__(root)
        self._shown_by_picture: dict[str, dict[int, list[float]] | None] = {}

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if (self.root / "Layout").is_dir() and (self.root / "PairAnnotation").is_dir():
            return None
        hint = " (did you mean its SPair-71k/ subfolder?)" if (self.root / "SPair-71k").is_dir() else ""
        return f"not a SPair-71k root: expected Layout/large/ and PairAnnotation/ in the folder that holds JPEGImages/{hint}"

    def split_file(self, split: str) -> Path | None:
        p = self.root / "Layout" / "large" / f"{split}.txt"
        return p if p.is_file() else None

    def expected_split_file(self, split: str) -> str:
        return f"Layout/large/{split}.txt"

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [self.read_pair(split, pid) for pid in ids]

    def read_pair(self, split: str, pair_id: str) -> PairRecord:
        rec = _read_pair_file(self.root / "PairAnnotation" / split / f"{pair_id}.json", pair_id, f"Layout/large/{split}.txt")
        slots = [int(k) for k in rec.meta["kps_ids"] if k.isdigit()]
        shown = self._shown(rec.trg) if rec.category in GEO_GROUPS and len(slots) == rec.n_points else None
        if shown is None:
            return rec
        groups = GEO_GROUPS[rec.category]
        return replace(rec, meta={**rec.meta, "geo_aware": geo_aware_points(groups, slots, shown), "geo_twins": geo_twins(groups, slots, shown)})

    def _shown(self, picture: str) -> dict[int, list[float]] | None:
        """The keypoints a picture's image annotation (``ImageAnnotation/<category>/<name>.json``)
        shows, slot -> [x, y]; None where the file is absent. Each file is read once."""
        if picture not in self._shown_by_picture:
            path = self.root / "ImageAnnotation" / Path(picture).relative_to("JPEGImages").with_suffix(".json")
            self._shown_by_picture[picture] = _shown_points(path) if path.is_file() else None
        return self._shown_by_picture[picture]


def _shown_points(path: Path) -> dict[int, list[float]]:
    kps = read_json(path, ("kps",), "the image's 30 keypoint slots").get("kps")
    if not isinstance(kps, dict) or not all(str(k).isdigit() for k in kps):
        raise DataError(path, "kps is not a mapping of keypoint slot to [x, y] or null")
    return {int(k): as_points([v], str(path), f"kps[{k}]")[0].tolist() for k, v in kps.items() if v is not None}


def _read_pair_file(path: Path, pair_id: str, listed_in: str) -> PairRecord:
    """One SPair-71k pair annotation file as a record (picture paths under ``JPEGImages/``)."""
    if not path.is_file():
        raise DataError(path, f"pair annotation is missing (listed in {listed_in})")
    ann = read_json(path)
    if not isinstance(ann, dict):
        raise DataError(path, "expected a JSON object")
    for key in PAIR_KEYS + DIFFICULTY_KEYS:
        if key not in ann:
            raise DataError(path, f"missing key {key!r}")
    cat = ann["category"]
    src_kps = as_points(ann["src_kps"], str(path), "src_kps")
    trg_kps = as_points(ann["trg_kps"], str(path), "trg_kps")
    if len(src_kps) != len(trg_kps):
        raise DataError(path, f"{len(src_kps)} source keypoints but {len(trg_kps)} target keypoints")
    src_size = _size(ann["src_imsize"], path, "src_imsize")
    trg_size = _size(ann["trg_imsize"], path, "trg_imsize")
    src_bbox = _box(ann["src_bndbox"], path, "src_bndbox")
    trg_bbox = _box(ann["trg_bndbox"], path, "trg_bndbox")
    meta = {k: int(ann[k]) for k in DIFFICULTY_KEYS}
    meta["mirror"] = int(ann.get("mirror", 0))
    meta["kps_ids"] = [str(k) for k in ann.get("kps_ids", [])]
    for k in ("src_pose", "trg_pose"):
        if k in ann:
            meta[k] = ann[k]
    return PairRecord(
        id=pair_id,
        category=cat,
        src=f"JPEGImages/{cat}/{ann['src_imname']}",
        trg=f"JPEGImages/{cat}/{ann['trg_imname']}",
        src_size=src_size,
        trg_size=trg_size,
        src_kps=src_kps,
        trg_kps=trg_kps,
        src_bbox=src_bbox,
        trg_bbox=trg_bbox,
        pck_base=pck_bases("bbox", trg_size, trg_kps, trg_bbox),
        meta=meta,
    )


def _size(v, path: Path, key: str) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) < 2:
        raise DataError(path, f"{key} is {v!r}, expected [width, height, depth]")
    w, h = int(v[0]), int(v[1])
    if w < 1 or h < 1:
        raise DataError(path, f"{key} is {v!r}, not a positive size")
    return w, h


def _box(v, path: Path, key: str) -> tuple[float, float, float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise DataError(path, f"{key} is {v!r}, expected [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(a) for a in v)
    if not (x2 >= x1 and y2 >= y1):
        raise DataError(path, f"{key} is {v!r}, x2 < x1 or y2 < y1")
    return x1, y1, x2, y2


class SPairU(SPair71k):
    """SPair-U (Mariotti et al., Jamais Vu, NeurIPS 2025): new keypoints, never seen in
    training, annotated on SPair-71k's test pairs, in SPair-71k's pair-annotation format.

    Either layout:

    - the SPair-U folder (``PairAnnotation/test/*.json``; MARCO links ``JPEGImages/`` and
      ``Layout/`` of SPair-71k into it), with ``images`` the SPair-71k folder when it holds
      no ``JPEGImages/`` of its own;
    - laid into the SPair-71k tree as Jamais Vu does: ``ExtraPairAnnotation/test/*.json``
      beside SPair-71k's own folders.

    The pairs are SPair-71k's ``Layout/large/test.txt`` order restricted to the pairs SPair-U
    annotates (as MARCO reads them), or the annotation files in name order where no layout
    file is there. The protocol is SPair-71k's (threshold: the target box's max side).
    """

    name = "spair-u"
    splits = ("test",)
    geo_source = ""  # new keypoints: SPair-71k's mirrored groups do not apply
    required = ("JPEGImages",)
    options = ("images",)

    def __init__(self, root: str | Path, images: str | Path | None = None):
        self.images = Path(images) if images is not None else None
        super().__init__(root)
        if self.images is not None:
            self.required = ()  # the pictures live in the SPair-71k folder
        self._ann = self.root / ("ExtraPairAnnotation" if (self.root / "ExtraPairAnnotation").is_dir() else "PairAnnotation")
        base = self.images if self.images is not None else self.root
        self._jpeg = Path(os.path.relpath(base / "JPEGImages", self.root)).as_posix()

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if not ((self.root / "PairAnnotation" / "test").is_dir() or (self.root / "ExtraPairAnnotation" / "test").is_dir()):
            return "not a SPair-U root: expected PairAnnotation/test/ (the SPair-U folder) or ExtraPairAnnotation/test/ (laid into SPair-71k)"
        if self.images is not None and not (self.images / "JPEGImages").is_dir():
            return f"--images {self.images}: not a SPair-71k folder (it has no JPEGImages/)"
        if self.images is None and not (self.root / "JPEGImages").is_dir():
            return "no JPEGImages/ here: give the SPair-71k folder that holds the pictures with --images"
        return None

    def split_file(self, split: str) -> Path | None:
        p = self._ann / split
        return p if split in self.splits and p.is_dir() else None

    def expected_split_file(self, split: str) -> str:
        return f"{self._ann.name}/{split}/"

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        annotated = {p.stem for p in path.glob("*.json")}
        layout = self.root / "Layout" / "large" / f"{split}.txt"
        if layout.is_file():
            listed = [line.strip() for line in layout.read_text(encoding="utf-8").splitlines() if line.strip()]
            ids = [pid for pid in listed if pid in annotated]
            ids += sorted(annotated.difference(listed))
        else:
            ids = sorted(annotated)
        return [self.read_pair(split, pid) for pid in ids]

    def read_pair(self, split: str, pair_id: str) -> PairRecord:
        rec = _read_pair_file(self._ann / split / f"{pair_id}.json", pair_id, f"{self._ann.name}/{split}/")
        return replace(rec, src=rec.src.replace("JPEGImages", self._jpeg, 1), trg=rec.trg.replace("JPEGImages", self._jpeg, 1))
