"""CUB-200-2011 (Wah et al., 2011) as the field evaluates correspondence on it.

``root`` is the ``CUB_200_2011/`` folder of the official download::

    images.txt  train_test_split.txt  bounding_boxes.txt  image_class_labels.txt  classes.txt
    parts/part_locs.txt  parts/parts.txt  images/<class>/<file>.jpg

No official pair list exists; pairs are made as DistillDIFT makes them
(``datasets/correspondence.py`` and ``eval.py`` of FrankFundel/DistillDIFT): per class, in
``images.txt`` order, every unordered pair of the split's images (``itertools.combinations``:
a before b), each with the parts visible in both (a pair may keep none); then the list is
shuffled with ``torch.manual_seed(42); torch.randperm`` and the first 1,000 are kept
(``all_pairs``: every pair, unshuffled). DistillDIFT reports PCK per keypoint, the
threshold α · max(w, h) of the target's box. Picture sizes come from the files' headers.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from sd4match.data.base import PairDataset
from sd4match.data.records import PairRecord, pck_bases
from sd4match.errors import DataError

N_PAIRS = 1000  # DistillDIFT's dataset_config.yaml: num_samples
SEED = 42


def _rows(path: Path, n: int) -> list[list[str]]:
    """The whitespace-separated rows of an official text file, each of at least ``n`` fields."""
    if not path.is_file():
        raise DataError(path, "annotation file is missing")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=n - 1) if n == 2 else line.split()
            if len(parts) < n:
                raise DataError(f"{path}:{i}", f"expected {n} fields, found {len(parts)}")
            rows.append(parts)
    return rows


def _floats(row: list[str], where: str) -> list[float]:
    try:
        return [float(v) for v in row]
    except ValueError:
        raise DataError(where, f"not a number in {' '.join(row)!r}") from None


def distilldift_order(n: int, seed: int = SEED) -> list[int]:
    """DistillDIFT's shuffle of ``n`` pairs: ``torch.manual_seed(seed); torch.randperm(n)``
    on the CPU generator (its own, so the caller's global seed is left alone)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


#: CUB-200-2011's 15 parts, ``parts/parts.txt``: id -> name (the ids of ``meta.part_ids``)
PARTS = {"1": "back", "2": "beak", "3": "belly", "4": "breast", "5": "crown", "6": "forehead", "7": "left eye", "8": "left leg", "9": "left wing",
         "10": "nape", "11": "right eye", "12": "right leg", "13": "right wing", "14": "tail", "15": "throat"}


class CUB200(PairDataset):
    name = "cub"
    splits = ("train", "test")
    keypoint_names = PARTS
    base_rule = "bbox"
    required = ("images.txt", "parts", "images")
    options = ("all_pairs",)
    convention = "DistillDIFT: test split, 1,000 shuffled within-class pairs; PCK per keypoint, α × max side of the target box"

    def __init__(self, root: str | Path, all_pairs: bool = False):
        self.all_pairs = bool(all_pairs)
        super().__init__(root)

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if (self.root / "images.txt").is_file() and (self.root / "parts").is_dir():
            return None
        hint = " (did you mean its CUB_200_2011/ subfolder?)" if (self.root / "CUB_200_2011").is_dir() else ""
        return f"not a CUB-200-2011 root: expected images.txt and parts/ in it{hint}"

    def split_file(self, split: str) -> Path | None:
        p = self.root / "train_test_split.txt"
        return p if split in self.splits and p.is_file() else None

    def expected_split_file(self, split: str) -> str:
        return "train_test_split.txt"

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        r = self.root
        images = [(i, name) for i, name in _rows(r / "images.txt", 2)]
        is_train = {i: v for i, v in _rows(path, 2)}
        labels = {i: int(c) for i, c in _rows(r / "image_class_labels.txt", 2)}
        classes = {int(i): name for i, name in _rows(r / "classes.txt", 2)}
        boxes = {row[0]: _floats(row[1:5], str(r / "bounding_boxes.txt")) for row in _rows(r / "bounding_boxes.txt", 5)}
        parts: dict[str, list[tuple[float, float, bool]]] = {}
        for row in _rows(r / "parts" / "part_locs.txt", 5):
            x, y = _floats(row[2:4], str(r / "parts" / "part_locs.txt"))
            parts.setdefault(row[0], []).append((x, y, row[4] == "1"))
        want = "1" if split == "train" else "0"
        for i, _ in images:
            for table, name in ((is_train, "train_test_split.txt"), (labels, "image_class_labels.txt"), (boxes, "bounding_boxes.txt"),
                                (parts, "parts/part_locs.txt")):
                if i not in table:
                    raise DataError(r / name, f"no row for image {i} (of images.txt)")
        chosen = [(i, name) for i, name in images if is_train[i] == want]
        out: list[PairRecord] = []
        for c in sorted(classes):
            members = [im for im in chosen if labels[im[0]] == c]
            for (ia, na), (ib, nb) in itertools.combinations(members, 2):
                out.append(self._record(ia, na, ib, nb, classes[c], parts, boxes))
        if not self.all_pairs:
            order = distilldift_order(len(out))
            out = [out[k] for k in order[:N_PAIRS]]
        return out

    def _record(self, ia, na, ib, nb, cls: str, parts, boxes) -> PairRecord:
        pa, pb = np.asarray(parts[ia], dtype=np.float64), np.asarray(parts[ib], dtype=np.float64)
        both = (pa[:, 2] > 0) & (pb[:, 2] > 0)
        src_rel, trg_rel = f"images/{na}", f"images/{nb}"
        trg_size = self.image_size(trg_rel)

        def xyxy(b):
            x, y, w, h = b
            return (x, y, x + w, y + h)

        trg_kps = pb[both, :2]
        return PairRecord(
            id=f"{ia}-{ib}",
            category=cls.split(".", 1)[-1],
            src=src_rel,
            trg=trg_rel,
            src_size=self.image_size(src_rel),
            trg_size=trg_size,
            src_kps=pa[both, :2],
            trg_kps=trg_kps,
            src_bbox=xyxy(boxes[ia]),
            trg_bbox=xyxy(boxes[ib]),
            pck_base=pck_bases("bbox", trg_size, trg_kps, xyxy(boxes[ib])),
            meta={"part_ids": [int(k) + 1 for k in np.nonzero(both)[0]]},
        )
