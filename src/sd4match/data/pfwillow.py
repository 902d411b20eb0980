"""PF-WILLOW (Ham et al., Proposal Flow): 900 test pairs, 10 keypoints each.

``root`` holds ``PF-dataset/<sub-class>/*.png`` and ``test_pairs.csv`` with columns
``imageA,imageB,XA1..XA10,YA1..YA10,XB1..XB10,YB1..YB10`` (paths relative to root).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd4match.data.base import PairDataset
from sd4match.data.pfpascal import read_csv
from sd4match.data.records import PairRecord, pck_bases
from sd4match.errors import DataError

N_KPS = 10


class PFWillow(PairDataset):
    name = "pfwillow"
    splits = ("test",)
    base_rule = "kps"
    required = ("PF-dataset",)

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if (self.root / "PF-dataset").is_dir() or (self.root / "test_pairs.csv").is_file():
            return None
        return "not a PF-Willow root: expected PF-dataset/ and test_pairs.csv in it"

    def split_file(self, split: str) -> Path | None:
        p = self.root / "test_pairs.csv"
        return p if split == "test" and p.is_file() else None

    def expected_split_file(self, split: str) -> str:
        return "test_pairs.csv"

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        cols = {c: [f"{c}{i}" for i in range(1, N_KPS + 1)] for c in ("XA", "YA", "XB", "YB")}
        rows = read_csv(path, required=("imageA", "imageB", *sum(cols.values(), [])))
        out = []
        for idx, (lineno, row) in enumerate(rows):
            where = f"{path}:{lineno}"
            try:
                vals = {c: np.array([float(row[k]) for k in keys]) for c, keys in cols.items()}
            except ValueError:
                raise DataError(where, "a keypoint coordinate is not a number") from None
            for c, v in vals.items():
                if not np.isfinite(v).all():
                    i = int(np.nonzero(~np.isfinite(v))[0][0]) + 1
                    raise DataError(where, f"{c}{i} is not finite ({row[f'{c}{i}']!r})")
            src, trg = row["imageA"].strip(), row["imageB"].strip()
            src_kps = np.stack([vals["XA"], vals["YA"]], axis=1)
            trg_kps = np.stack([vals["XB"], vals["YB"]], axis=1)
            trg_size = self.image_size(trg)
            out.append(
                PairRecord(
                    id=str(idx),
                    category=Path(src).parent.name,
                    src=src,
                    trg=trg,
                    src_size=self.image_size(src),
                    trg_size=trg_size,
                    src_kps=src_kps,
                    trg_kps=trg_kps,
                    src_bbox=None,
                    trg_bbox=None,
                    pck_base=pck_bases("kps", trg_size, trg_kps, None),
                    meta={},
                )
            )
        return out
