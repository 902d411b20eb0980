"""PF-PASCAL (Ham et al., Proposal Flow) with the weakalign / NC-Net pair lists.

``root`` holds ``PF-dataset-PASCAL/`` and the pair lists::

    PF-dataset-PASCAL/JPEGImages/<image>.jpg
    PF-dataset-PASCAL/Annotations/<class>/<image>.mat     (kps: N x 2 with NaN rows, bbox)
    {trn,val,test}_pairs.csv                              (trn may be named train_pairs.csv)

Pair lists are ``source_image,target_image,class,flip`` (keypoints from the .mat files) or
``source_image,target_image,class,XA,YA,XB,YB`` with ``;``-separated coordinates.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from sd4match.data.base import PairDataset
from sd4match.data.records import PairRecord, pck_bases
from sd4match.errors import DataError
from sd4match.fileio import read_user_text

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IMAGE_DIR = "PF-dataset-PASCAL/JPEGImages"
ANN_DIR = "PF-dataset-PASCAL/Annotations"
_LIST_NAMES = {"trn": ("trn_pairs.csv", "train_pairs.csv"), "val": ("val_pairs.csv",), "test": ("test_pairs.csv",)}


class PFPascal(PairDataset):
    name = "pfpascal"
    splits = ("trn", "val", "test")
    base_rule = "image"
    required = ("PF-dataset-PASCAL/JPEGImages", "PF-dataset-PASCAL/Annotations")

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if (self.root / "PF-dataset-PASCAL").is_dir() or any(self.split_file(s) for s in self.splits):
            return None
        return "not a PF-Pascal root: expected PF-dataset-PASCAL/ and {trn,val,test}_pairs.csv in it"

    def split_file(self, split: str) -> Path | None:
        for name in _LIST_NAMES[split]:
            p = self.root / name
            if p.is_file():
                return p
        return None

    def expected_split_file(self, split: str) -> str:
        return " or ".join(_LIST_NAMES[split])

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        rows = read_csv(path, required=("source_image", "target_image", "class"))
        header = rows[0][1].keys() if rows else ()
        inline = all(k in header for k in ("XA", "YA", "XB", "YB"))
        mats: dict[str, tuple[np.ndarray, tuple | None]] = {}
        out = []
        for idx, (lineno, row) in enumerate(rows):
            where = f"{path}:{lineno}"
            try:
                cls_idx = int(row["class"])
            except ValueError:
                raise DataError(where, f"class {row['class']!r} is not an integer") from None
            if not 1 <= cls_idx <= len(CLASSES):
                raise DataError(where, f"class {cls_idx} is outside 1..{len(CLASSES)}")
            cat = CLASSES[cls_idx - 1]
            src, trg = row["source_image"].strip(), row["target_image"].strip()
            src_size, trg_size = self.image_size(src), self.image_size(trg)
            if inline:
                src_kps = _xy(row["XA"], row["YA"], where, "XA/YA")
                trg_kps = _xy(row["XB"], row["YB"], where, "XB/YB")
                if len(src_kps) != len(trg_kps):
                    raise DataError(where, f"{len(src_kps)} source keypoints but {len(trg_kps)} target keypoints")
                src_bbox = self._annotation(src, cat, mats, required=False)[1]
                trg_bbox = self._annotation(trg, cat, mats, required=False)[1]
            else:
                s_kps, src_bbox = self._annotation(src, cat, mats, required=True)
                t_kps, trg_bbox = self._annotation(trg, cat, mats, required=True)
                if len(s_kps) != len(t_kps):
                    raise DataError(where, f"annotations of {src} and {trg} have {len(s_kps)} and {len(t_kps)} keypoint slots")
                keep = np.isfinite(s_kps).all(axis=1) & np.isfinite(t_kps).all(axis=1)
                src_kps, trg_kps = s_kps[keep], t_kps[keep]
            meta: dict = {"class_index": cls_idx}
            if "flip" in row and row["flip"] not in (None, ""):
                meta["flip"] = int(float(row["flip"]))
            out.append(
                PairRecord(
                    id=str(idx),
                    category=cat,
                    src=src,
                    trg=trg,
                    src_size=src_size,
                    trg_size=trg_size,
                    src_kps=src_kps,
                    trg_kps=trg_kps,
                    src_bbox=src_bbox,
                    trg_bbox=trg_bbox,
                    pck_base=pck_bases("image", trg_size, trg_kps, trg_bbox),
                    meta=meta,
                )
            )
        return out

    def annotation_path(self, image_rel: str, category: str) -> Path:
        return self.root / ANN_DIR / category / (Path(image_rel).stem + ".mat")

    def _annotation(self, image_rel: str, category: str, cache: dict, *, required: bool):
        key = f"{category}/{image_rel}"
        if key not in cache:
            path = self.annotation_path(image_rel, category)
            if not path.is_file():
                if required:
                    raise DataError(path, "keypoint annotation (.mat) is missing")
                cache[key] = (np.zeros((0, 2)), None)
            else:
                cache[key] = read_mat_annotation(path)
        return cache[key]


def read_mat_annotation(path: Path) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """``kps`` (N x 2, NaN rows kept) and ``bbox`` from a PF-PASCAL .mat file."""
    from scipy.io import loadmat

    try:
        m = loadmat(str(path))
    except Exception as e:  # scipy raises several types for corrupt files
        raise DataError(path, f"cannot read .mat annotation ({e})") from None
    if "kps" not in m:
        raise DataError(path, "missing key 'kps'")
    kps = np.asarray(m["kps"], dtype=np.float64)
    if kps.ndim != 2 or kps.shape[1] != 2:
        raise DataError(path, f"kps has shape {list(kps.shape)}, expected [N, 2]")
    bbox = None
    if "bbox" in m:
        b = np.asarray(m["bbox"], dtype=np.float64).reshape(-1)
        if b.size != 4:
            raise DataError(path, f"bbox has {b.size} values, expected 4")
        bbox = tuple(float(v) for v in b)
    return kps, bbox


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a pair list as (line number, {column: value}); one-line errors for bad rows.
    A list saved by a spreadsheet (a UTF-8 byte-order mark, CRLF lines) reads as the original."""
    reader = csv.reader(io.StringIO(read_user_text(path, DataError), newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(path, "pair list is empty (no header row)")
    header = [h.strip() for h in header]
    for col in required:
        if col not in header:
            raise DataError(path, f"header has no column {col!r} (found: {','.join(header)})")
    rows = []
    for lineno, row in enumerate(reader, 2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}", f"expected {len(header)} columns, got {len(row)}")
        rows.append((lineno, dict(zip(header, row))))
    return rows


def _xy(xs: str, ys: str, where: str, what: str) -> np.ndarray:
    try:
        x = [float(v) for v in xs.split(";") if v.strip()]
        y = [float(v) for v in ys.split(";") if v.strip()]
    except ValueError:
        raise DataError(where, f"{what} holds a value that is not a number") from None
    if len(x) != len(y):
        raise DataError(where, f"{what}: {len(x)} x values but {len(y)} y values")
    pts = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1) if x else np.zeros((0, 2))
    if not np.isfinite(pts).all():
        raise DataError(where, f"{what} holds a NaN or infinite coordinate")
    return pts
