"""MP-100 (Xu et al., Pose for Everything, 2022) as MARCO evaluates correspondence on it.

``root`` is the folder MARCO calls ``mp100_all/``::

    pairs/pairs_{animal_body_unseen,animal_face,clothing,furniture,human_face}.json
    annotations/mp100_split{1..5}_test.json        (COCO keypoints format)
    mp100/<category>/<file>.jpg                     (the pictures; or images/<category>/...)

Each pair list entry is ``{episode_idx, category_id, src_file, trg_file}``, the files named
as the annotations' ``file_name``. The split is the pair list (the domain).

A picture may hold several annotated instances (up to 7). This reader takes, in each
picture, the first instance with keypoints (annotation-file order, the order MARCO reads
them), and keeps the keypoint indices visible (v > 0) in both pictures, so that row i of
the source matches row i of the target. The PCK threshold is α × max(w, h) of the target
instance's box. MARCO's own loader instead pools the visible keypoints of all instances of
each picture separately and cuts both lists to the shorter one, which pairs unrelated
keypoints whenever visibility differs (most ``animal_body_unseen`` pairs); its numbers
are not reproduced here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sd4match.data.base import PairDataset
from sd4match.data.records import PairRecord, coco_keypoints, pck_bases, read_json, xywh_box
from sd4match.errors import DataError

DOMAINS = ("animal_body_unseen", "animal_face", "clothing", "furniture", "human_face")


class MP100(PairDataset):
    name = "mp100"
    splits = DOMAINS
    base_rule = "bbox"
    required = ("pairs", "annotations")
    groups = ("domain",)
    convention = "MARCO: five domain pair lists of 2,000 pairs; PCK per image, α × max side of the target box (MARCO's keypoint alignment fixed)"

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if (self.root / "pairs").is_dir() and (self.root / "annotations").is_dir():
            return None
        hint = " (did you mean its mp100_all/ folder?)" if (self.root / "mp100_all").is_dir() else ""
        return f"not an MP-100 root: expected pairs/ (MARCO's pair lists) and annotations/ in it{hint}"

    @property
    def picture_dir(self) -> str:
        """Where the pictures' ``file_name``s are rooted, relative to ``root``."""
        return next((d for d in ("mp100", "images") if (self.root / d).is_dir()), "mp100")

    def split_file(self, split: str) -> Path | None:
        p = self.root / "pairs" / f"pairs_{split}.json"
        return p if split in self.splits and p.is_file() else None

    def expected_split_file(self, split: str) -> str:
        return f"pairs/pairs_{split}.json"

    @functools.cached_property
    def _index(self) -> tuple[dict[str, tuple[dict, dict | None, Path]], dict[int, dict]]:
        """file_name -> (image record, its first annotation with keypoints or None, file);
        category id -> category (every ``annotations/*test*.json``)."""
        files = sorted((self.root / "annotations").glob("*test*.json"))
        if not files:
            raise DataError(self.root / "annotations", "no test annotation file (mp100_split{1..5}_test.json) in it")
        pictures: dict[str, tuple[dict, dict | None, Path]] = {}
        cats: dict[int, dict] = {}
        for f in files:
            coco = read_json(f, ("images", "annotations"), "a COCO annotation file")
            images, anns = coco["images"], coco["annotations"]
            for c in coco.get("categories", []):
                cats[int(c["id"])] = c
            first: dict = {}
            for a in anns:
                if a.get("keypoints") and a.get("num_keypoints", 0) > 0 and a["image_id"] not in first:
                    first[a["image_id"]] = a
            for im in images:
                pictures.setdefault(im["file_name"], (im, first.get(im["id"]), f))
        return pictures, cats

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        pairs = read_json(path)
        if not isinstance(pairs, list):
            raise DataError(path, "expected a list of {episode_idx, category_id, src_file, trg_file}")
        pictures, cats = self._index
        base = self.picture_dir
        out = []
        for i, p in enumerate(pairs):
            where = f"{path}[{i}]"
            try:
                cat, src, trg = int(p["category_id"]), p["src_file"], p["trg_file"]
            except (KeyError, TypeError, ValueError):
                raise DataError(where, "expected {episode_idx, category_id, src_file, trg_file}") from None
            sides = []
            for f in (src, trg):
                got = pictures.get(f)
                if got is None:
                    raise DataError(where, f"{f} is in no annotations/*test*.json")
                if got[1] is None:
                    raise DataError(got[2], f"{f}: no instance with keypoints")
                sides.append(got)
            (im_s, ann_s, fs), (im_t, ann_t, ft) = sides
            ks, kt = coco_keypoints(ann_s["keypoints"], str(fs)), coco_keypoints(ann_t["keypoints"], str(ft))
            if len(ks) != len(kt):
                raise DataError(where, f"{len(ks)} source keypoints but {len(kt)} target keypoints (categories differ?)")
            both = (ks[:, 2] > 0) & (kt[:, 2] > 0)
            trg_size = (int(im_t["width"]), int(im_t["height"]))
            trg_box = xywh_box(ann_t["bbox"], str(ft))
            trg_kps = kt[both, :2]
            name = cats.get(cat, {}).get("name", str(cat))
            out.append(PairRecord(
                id=str(p.get("episode_idx", i)),
                category=name,
                src=f"{base}/{src}" if base else src,
                trg=f"{base}/{trg}" if base else trg,
                src_size=(int(im_s["width"]), int(im_s["height"])),
                trg_size=trg_size,
                src_kps=ks[both, :2],
                trg_kps=trg_kps,
                src_bbox=xywh_box(ann_s["bbox"], str(fs)),
                trg_bbox=trg_box,
                pck_base=pck_bases("bbox", trg_size, trg_kps, trg_box),
                meta={"groups": {"domain": split}, "kps_ids": [int(k) for k in np.nonzero(both)[0]], "category_id": cat,
                      "instances": "first with keypoints"},
            ))
        return out
