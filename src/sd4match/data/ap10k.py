"""AP-10K (Yu et al., NeurIPS 2021 Datasets) as the field evaluates correspondence on it.

The correspondence layout (GeoAware-SC's ``prepare_ap10k.ipynb``, which MARCO and Jamais Vu
reuse), under ``root``::

    ImageAnnotation/<family>/<species>/<image id:012d>.json   {**annotation, **image, name, supercategory}
    JPEGImages/<family>/<species>/<image id:012d>.jpg
    PairAnnotation/<split>/<src id>-<trg id>:<species|family|all>.json   {"src_json_path", "trg_json_path"}

Splits: ``trn``, ``val``, ``test`` (intra-species), ``test_cross_species`` and
``val_cross_species`` (two species of one family), ``test_cross_family`` and
``val_cross_family``. ``prepare_ap10k`` builds the layout from the official download; a
tree built by GeoAware-SC or MARCO reads as well (their ``*_json_path`` are relative to
their working folder, or absolute: resolved from the ``ImageAnnotation/`` part on).

Protocol (GeoAware-SC's ``load_ap10k_data``): keypoints with v > 0, kept where visible in
both pictures; threshold α × max(w, h) of the target box (COCO ``[x, y, w, h]``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from sd4match.data.base import PairDataset
from sd4match.data.records import PairRecord, coco_keypoints, geo_aware_points, geo_twins, pck_bases, read_json, xywh_box
from sd4match.errors import DataError

SPLITS = ("trn", "val", "test", "test_cross_species", "val_cross_species", "test_cross_family", "val_cross_family")
CROWD_FILE = "ap-10k_is_crowd.txt"
CROWD_SOURCE = "https://raw.githubusercontent.com/Junyi42/GeoAware-SC/master/data/ap-10k_is_crowd.txt"
#: the 17 keypoints' groups that mirror one another (GeoAware-SC's ``AP10K_GEO_AWARE``):
#: shoulders; elbows and knees; front and back paws; hips
GEO_GROUPS = ((5, 8), (6, 9, 12, 15), (7, 10, 13, 16), (11, 14))


#: AP-10K's 17 keypoints in their order (its COCO categories' ``keypoints``): the ids of ``meta.kps_ids``
KEYPOINTS = ("left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow", "left_front_paw", "right_shoulder",
             "right_elbow", "right_front_paw", "left_hip", "left_knee", "left_back_paw", "right_hip", "right_knee", "right_back_paw")


class AP10K(PairDataset):
    name = "ap10k"
    splits = SPLITS
    keypoint_names = {str(i): n for i, n in enumerate(KEYPOINTS)}
    base_rule = "bbox"
    required = ("ImageAnnotation", "JPEGImages", "PairAnnotation")
    groups = ("species", "family")
    geo_source = "the target's keypoint visibility"
    convention = ("GeoAware-SC: intra-species, cross-species, cross-family pairs; PCK per image and per point, "
                  "α × max side of the target box")

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "dataset root does not exist"
        if (self.root / "PairAnnotation").is_dir() and (self.root / "ImageAnnotation").is_dir():
            return None
        if (self.root / "annotations").is_dir() and (self.root / "data").is_dir():
            return f"the official AP-10K download, not the correspondence layout: run `sd4match datasets prepare ap10k --from {self.root} --root OUT`"
        return "not an AP-10K correspondence root: expected PairAnnotation/ and ImageAnnotation/ (`sd4match datasets prepare ap10k` makes them)"

    def split_file(self, split: str) -> Path | None:
        p = self.root / "PairAnnotation" / split
        return p if split in self.splits and p.is_dir() else None

    def expected_split_file(self, split: str) -> str:
        return f"PairAnnotation/{split}/"

    def _annotation(self, given: str, where: Path) -> Path:
        """An ``*_json_path`` as a file under ``root``: absolute, relative to the root, or from
        its ``ImageAnnotation/`` part on (trees built from another working folder)."""
        p = Path(given)
        if p.is_absolute() and p.is_file():
            return p
        parts = p.parts
        cands = [self.root / p]
        if "ImageAnnotation" in parts:
            k = len(parts) - 1 - parts[::-1].index("ImageAnnotation")
            cands.insert(0, self.root.joinpath(*parts[k:]))
        for c in cands:
            if c.is_file():
                return c
        raise DataError(where, f"{given}: image annotation not found (looked for {cands[0]})")

    @functools.cached_property
    def _images(self) -> dict[Path, dict]:
        """Image annotations read so far (each file once: pictures recur across pairs)."""
        return {}

    def _image(self, path: Path) -> dict:
        if path not in self._images:
            self._images[path] = read_json(path, ("width", "height", "bbox", "keypoints", "name", "supercategory"))
        return self._images[path]

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        out = []
        for f in sorted(path.glob("*.json")):
            pair = read_json(f, ("src_json_path", "trg_json_path"))
            src_json, trg_json = pair["src_json_path"], pair["trg_json_path"]
            ps, pt = self._annotation(src_json, f), self._annotation(trg_json, f)
            s, t = self._image(ps), self._image(pt)
            ks, kt = coco_keypoints(s["keypoints"], str(ps)), coco_keypoints(t["keypoints"], str(pt))
            if len(ks) != len(kt):
                raise DataError(f, f"{len(ks)} source keypoints but {len(kt)} target keypoints")
            both = (ks[:, 2] > 0) & (kt[:, 2] > 0)
            trg_size = (int(t["width"]), int(t["height"]))
            trg_box = xywh_box(t["bbox"], str(pt))
            trg_kps = kt[both, :2]
            ids = np.nonzero(both)[0].tolist()
            shown = {i: kt[i, :2].tolist() for i in np.nonzero(kt[:, 2] > 0)[0].tolist()}  # every keypoint the target shows
            groups = {"family": t["supercategory"] if s["supercategory"] == t["supercategory"] else "cross-family"}
            if s["name"] == t["name"]:
                groups["species"] = t["name"]
            out.append(PairRecord(
                id=f.stem,
                category=f.stem.rsplit(":", 1)[-1],
                src=self._picture(ps),
                trg=self._picture(pt),
                src_size=(int(s["width"]), int(s["height"])),
                trg_size=trg_size,
                src_kps=ks[both, :2],
                trg_kps=trg_kps,
                src_bbox=xywh_box(s["bbox"], str(ps)),
                trg_bbox=trg_box,
                pck_base=pck_bases("bbox", trg_size, trg_kps, trg_box),
                meta={"groups": groups, "kps_ids": ids, "geo_aware": geo_aware_points(GEO_GROUPS, ids, shown), "geo_twins": geo_twins(GEO_GROUPS, ids, shown),
                      "src_species": s["name"], "trg_species": t["name"], "src_family": s["supercategory"], "trg_family": t["supercategory"]},
            ))
        return out

    def _picture(self, annotation: Path) -> str:
        """The picture of an image annotation (GeoAware-SC: ``ImageAnnotation`` -> ``JPEGImages``, ``.json`` -> ``.jpg``), relative to root."""
        rel = Path(os.path.relpath(annotation, self.root)).as_posix()
        return rel.replace("ImageAnnotation", "JPEGImages", 1).rsplit(".", 1)[0] + ".jpg"


# ------------------------------------------------------------------------------ building the layout
def _mutual(a: np.ndarray, b: np.ndarray) -> float:
    """GeoAware-SC's mutual visibility of two (17, 3) keypoint arrays: sum of (v_a/2)(v_b/2)."""
    return float((a[:, 2] / 2 * b[:, 2] / 2).sum())


def prepare_ap10k(src: str | Path, out: str | Path, *, crowd: str | Path | None = None, link: bool = True) -> dict[str, int]:
    """Build the correspondence layout from the official AP-10K download.

    As GeoAware-SC's ``prepare_ap10k.ipynb``, with two differences that make it
    deterministic: folders and files are taken in sorted order (the notebook takes
    ``os.listdir``'s, which depends on the file system), and nothing in ``src`` is moved
    (pictures are hard-linked, or copied where links are not possible). Every random draw
    is the notebook's, in its order (``random.seed(42)`` at the start of the intra-species,
    cross-species and cross-family stages), so on a file system that lists names in sorted
    order the result is the notebook's own.

    Args:
        src: the download: ``annotations/ap10k-{train,val,test}-split1.json`` and ``data/``.
        out: the new root (must not hold a layout yet).
        crowd: GeoAware-SC's list of crowd images (default: ``src/ap-10k_is_crowd.txt``).
        link: hard-link the pictures (False: copy them).

    Returns:
        pairs per split.
    """
    src, out = Path(src), Path(out)
    ann_dir = src / "annotations"
    files = [ann_dir / f"ap10k-{s}-split1.json" for s in ("train", "test", "val")]  # the notebook's order
    for f in files:
        if not f.is_file():
            raise DataError(f, "missing: --from must be the AP-10K download (annotations/ap10k-{train,val,test}-split1.json and data/)")
    crowd = Path(crowd) if crowd is not None else src / CROWD_FILE
    if not crowd.is_file():
        raise DataError(crowd, f"missing: the list of crowd images GeoAware-SC excludes; get it from {CROWD_SOURCE} and pass --crowd")
    if (out / "PairAnnotation").exists() or (out / "ImageAnnotation").exists():
        raise DataError(out, "already holds an AP-10K layout; choose an empty --root")
    crowd_ids = {line.strip() for line in crowd.read_text(encoding="utf-8").splitlines() if line.strip()}
    annotations, images, categories = [], [], []
    for f in files:
        d = read_json(f, ("images", "annotations"), "a COCO annotation file")
        annotations += d["annotations"]
        images += d["images"]
        categories = categories or d.get("categories", [])
    first: dict[int, dict] = {}
    for a in annotations:  # the first annotation of each image
        first.setdefault(a["image_id"], a)
    by_id = {im["id"]: im for im in images}
    cats = {c["id"]: c for c in categories}
    species: dict[tuple[str, str], list[str]] = {}  # (family, species) -> kept annotation files (root-relative)
    kps: dict[str, np.ndarray] = {}
    for image_id, a in first.items():
        if image_id not in by_id or a.get("category_id") not in cats:
            continue
        im, c = by_id[image_id], cats[a["category_id"]]
        rec = {**a, **im, "name": c["name"], "supercategory": c["supercategory"]}
        stem = f"{int(rec['id']):012d}"
        rel = f"ImageAnnotation/{c['supercategory']}/{c['name']}/{stem}.json"
        picture = src / "data" / im["file_name"]
        if not picture.is_file():
            raise DataError(picture, "image file is missing (listed in the annotations)")
        if stem in crowd_ids:
            rec["is_crowd"] = 1
        _write_json(out / rel, rec)
        _place(picture, out / f"JPEGImages/{c['supercategory']}/{c['name']}/{stem}.jpg", link)
        if stem not in crowd_ids and rec["num_keypoints"] >= 3:
            species.setdefault((c["supercategory"], c["name"]), []).append(rel)
            kps[rel] = coco_keypoints(rec["keypoints"], str(out / rel))
    lists: dict[str, dict[tuple[str, str], list[str]]] = {"trn": {}, "val": {}, "test": {}}
    for key in sorted(species):
        files_ = sorted(species[key])
        n_test = min(30, len(files_))
        n_val = min(20, max(0, len(files_) - n_test))
        n_trn = max(0, len(files_) - n_test - n_val)
        lists["trn"][key], lists["val"][key], lists["test"][key] = files_[:n_trn], files_[n_trn:n_trn + n_val], files_[len(files_) - n_test:]
    counts: dict[str, int] = {}

    def write(split: str, pairs, tag) -> None:
        for a, b in pairs:
            name = f"{Path(a).stem}-{Path(b).stem}:{tag(a)}.json"
            _write_json(out / "PairAnnotation" / split / name, {"src_json_path": a, "trg_json_path": b})
        counts[split] = counts.get(split, 0) + len(pairs)

    rng = random.Random(42)  # intra-species: trn, then test, then val
    for split in ("trn", "test", "val"):
        for key, members in lists[split].items():
            members = list(members)
            n = 50 * len(members) if split == "trn" else len(members) * (len(members) - 1) // 2
            rng.shuffle(members)
            possible = [p for p in itertools.combinations(members, 2) if _mutual(kps[p[0]], kps[p[1]]) >= 3]
            n = min(n, len(possible))
            write(split, rng.sample(possible, n) if n > 0 else [], lambda a: Path(a).parent.name)
    families: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(species):
        families.setdefault(key[0], []).append(key)
    rng = random.Random(42)  # cross-species: val, then test
    for split, per_family in (("val", 400), ("test", 900)):
        for fam, keys in families.items():
            if len(keys) < 2:
                continue
            pool = []
            for ka, kb in itertools.combinations(keys, 2):
                prod = list(itertools.product(lists[split][ka], lists[split][kb]))
                for _ in prod:  # the notebook draws once per pair to swap it, and keeps the pair as it was
                    rng.random()
                pool += prod
            possible = [p for p in pool if _mutual(kps[p[0]], kps[p[1]]) >= 3]
            write(f"{split}_cross_species", rng.sample(possible, min(per_family, len(possible))), lambda a: Path(a).parent.parent.name)
    rng = random.Random(42)  # cross-family: test, then val
    for split, per_combination in (("test", 30), ("val", 20)):
        members = {fam: [f for k in keys for f in lists[split][k]] for fam, keys in families.items()}
        for fa, fb in itertools.combinations(list(members), 2):
            possible = [p for p in itertools.product(members[fa], members[fb]) if _mutual(kps[p[0]], kps[p[1]]) >= 3]
            write(f"{split}_cross_family", rng.sample(possible, min(per_combination, len(possible))), lambda a: "all")
    for split in SPLITS:
        (out / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
        counts.setdefault(split, 0)
    return counts


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
