"""Synthetic pairs with exact ground truth: seeded random warps of real images.

Coordinates are continuous pixels: the image covers [0, W] x [0, H] and pixel (i, j)
has its centre at (i + 0.5, j + 0.5). In that convention a homography ``H`` maps source
points to target points exactly, PIL's ``Image.transform`` samples the same geometry,
and a left-right mirror is x -> W - x.

``SyntheticPairs`` is the ``synthetic`` dataset: every image under ``root`` (no labels
needed) is a source; trn / val / test use disjoint source images.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from sd4match.data.base import PairDataset
from sd4match.data.images import list_images
from sd4match.data.records import PairRecord, pck_bases
from sd4match.errors import DataError

WarpKind = Literal["homography", "affine"]


@dataclass(frozen=True)
class WarpConfig:
    """How strong the random warps are."""

    kind: WarpKind = "homography"  # homography (affine + corner jitter) or affine only
    rotation_deg: float = 15.0  # rotation drawn uniformly in [-r, r]
    scale: tuple[float, float] = (0.85, 1.15)  # isotropic scale range
    translation: float = 0.08  # shift, as a fraction of width / height
    shear: float = 0.08  # shear factor range [-s, s]
    perspective: float = 0.06  # corner jitter, fraction of width / height (homography only)
    mirror_prob: float = 0.0  # chance that the target is also mirrored left-right
    color: float = 0.15  # brightness / contrast / saturation factors in [1 - c, 1 + c]
    grid: int = 5  # keypoints: a grid x grid lattice over the central 80 % of the source
    pairs_per_image: int = 4  # warps drawn per source image

    def __post_init__(self):
        if self.kind not in ("homography", "affine"):
            raise ValueError(f"unknown warp kind {self.kind!r}; expected homography or affine")
        lo, hi = self.scale
        wrong = {"scale": not 0 < lo <= hi, "mirror_prob": not 0 <= self.mirror_prob <= 1, "color": not 0 <= self.color < 1,
                 "grid": self.grid < 1, "pairs_per_image": self.pairs_per_image < 1,
                 **{k: getattr(self, k) < 0 for k in ("rotation_deg", "translation", "shear", "perspective")}}
        bad = [k for k, w in wrong.items() if w]
        if bad:
            raise ValueError(f"warp setting {bad[0]} = {getattr(self, bad[0])!r} is out of range (scale: 0 < low <= high; mirror_prob: [0, 1]; "
                             "color: [0, 1); grid, pairs_per_image: at least 1; the others: at least 0)")


@dataclass(frozen=True)
class SyntheticPair:
    """A warped target with the exact correspondence of the given points."""

    image: Image.Image
    homography: np.ndarray  # (3, 3) source -> target, continuous pixel coordinates
    src_kps: np.ndarray  # (N, 2) source points kept (those landing inside the target)
    trg_kps: np.ndarray  # (N, 2) exact target points, in label order
    keep: np.ndarray  # (M,) bool, which input points were kept
    mirror: bool
    color: tuple[float, float, float]


def apply_homography(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 3 x 3 homography."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    ph = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ np.asarray(H, dtype=np.float64).T
    return ph[:, :2] / ph[:, 2:3]


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The homography mapping 4 points ``src`` onto ``dst`` exactly (DLT, h33 = 1)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        b.append(u)
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.append(v)
    h = np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def mirror_matrix(width: float) -> np.ndarray:
    """x -> W - x in continuous pixel coordinates."""
    return np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def random_homography(size: Sequence[int], rng: np.random.Generator, cfg: WarpConfig) -> np.ndarray:
    """A random warp (3 x 3, source -> target) of an image of ``size`` = (W, H) onto itself."""
    w, h = float(size[0]), float(size[1])
    c = np.array([w / 2, h / 2])
    th = math.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    s = rng.uniform(*cfg.scale)
    sh = rng.uniform(-cfg.shear, cfg.shear)
    t = rng.uniform(-cfg.translation, cfg.translation, size=2) * np.array([w, h])
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    lin = rot @ np.array([[s, s * sh], [0.0, s]])
    A = np.eye(3)
    A[:2, :2] = lin
    A[:2, 2] = c + t - lin @ c
    if cfg.kind == "affine":
        return A
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    jitter = rng.uniform(-cfg.perspective, cfg.perspective, size=(4, 2)) * np.array([w, h])
    return homography_from_points(corners, apply_homography(A, corners) + jitter)


def warp_image(image: Image.Image, H: np.ndarray, out_size: Sequence[int] | None = None) -> Image.Image:
    """Render ``image`` warped by ``H`` (source -> target) with bicubic sampling.

    PIL samples output pixel centres (i + 0.5, j + 0.5) at ``H^-1`` of them, the same
    continuous convention as the points.
    """
    out_size = tuple(out_size or image.size)
    inv = np.linalg.inv(np.asarray(H, dtype=np.float64))
    inv = inv / inv[2, 2]
    return image.transform(
        out_size, Image.Transform.PERSPECTIVE, tuple(inv.reshape(-1)[:8]), resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0)
    )


def color_jitter(image: Image.Image, factors: Sequence[float]) -> Image.Image:
    b, c, s = factors
    image = ImageEnhance.Brightness(image).enhance(b)
    image = ImageEnhance.Contrast(image).enhance(c)
    return ImageEnhance.Color(image).enhance(s)


def grid_points(size: Sequence[int], n: int, margin: float = 0.1) -> np.ndarray:
    """An n x n lattice over the central part of an image of ``size`` = (W, H)."""
    w, h = size
    xs = np.linspace(margin * w, (1 - margin) * w, n)
    ys = np.linspace(margin * h, (1 - margin) * h, n)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def draw_warp(size: Sequence[int], rng: np.random.Generator, cfg: WarpConfig) -> tuple[np.ndarray, bool, tuple[float, float, float]]:
    """Draw everything random about one pair: homography (mirror included), mirror flag, colour factors."""
    H = random_homography(size, rng, cfg)
    mirror = bool(rng.random() < cfg.mirror_prob)
    if mirror:
        H = mirror_matrix(size[0]) @ H
    color = tuple(float(v) for v in rng.uniform(1 - cfg.color, 1 + cfg.color, size=3))
    return H, mirror, color


def render_target(image: Image.Image, H: np.ndarray, color: Sequence[float]) -> Image.Image:
    return color_jitter(warp_image(image.convert("RGB"), H), color)


def correspond(
    H: np.ndarray,
    size: Sequence[int],
    src_kps: np.ndarray,
    mirror: bool,
    flip_permutation: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact target points of ``src_kps`` under ``H``; drop those leaving the target.

    When the target is mirrored and ``flip_permutation`` is given (``perm[i]`` = index of
    the label that label ``i`` becomes under a mirror, e.g. left eye <-> right eye), the
    target point listed for label ``i`` is the image of source point ``perm[i]``: what a
    semantic annotator would label ``i`` in the mirrored picture. Without it, rows keep
    their geometric correspondence.

    Returns:
        (kept source points, their target points, keep mask over the input points).
    """
    src_kps = np.asarray(src_kps, dtype=np.float64).reshape(-1, 2)
    if mirror and flip_permutation is not None:
        perm = np.asarray(flip_permutation, dtype=int)
        if sorted(perm.tolist()) != list(range(len(src_kps))):
            raise ValueError(f"flip_permutation must permute 0..{len(src_kps) - 1}")
        trg = apply_homography(H, src_kps[perm])
    else:
        trg = apply_homography(H, src_kps)
    w, h = size
    keep = (trg[:, 0] >= 0) & (trg[:, 0] <= w) & (trg[:, 1] >= 0) & (trg[:, 1] <= h)
    return src_kps[keep], trg[keep], keep


def draw_pair_geometry(
    size: Sequence[int],
    rng: np.random.Generator,
    cfg: WarpConfig,
    src_kps: np.ndarray,
    flip_permutation: Sequence[int] | None = None,
    max_tries: int = 20,
):
    """Draw warps until at least one point lands inside the target.

    Returns:
        (H, mirror, color, kept source points, target points, keep mask).
    """
    for _ in range(max_tries):
        H, mirror, color = draw_warp(size, rng, cfg)
        s, t, keep = correspond(H, size, src_kps, mirror, flip_permutation)
        if keep.any():
            return H, mirror, color, s, t, keep
    raise ValueError("no keypoint stays inside the warped image; use milder warps")


def make_pair(
    image: Image.Image,
    rng: np.random.Generator,
    cfg: WarpConfig = WarpConfig(),
    src_kps: np.ndarray | None = None,
    flip_permutation: Sequence[int] | None = None,
) -> SyntheticPair:
    """Warp ``image`` at random and give the exact target of ``src_kps`` (default: a grid)."""
    size = image.size
    pts = grid_points(size, cfg.grid) if src_kps is None else np.asarray(src_kps, dtype=np.float64)
    H, mirror, color, s, t, keep = draw_pair_geometry(size, rng, cfg, pts, flip_permutation)
    return SyntheticPair(render_target(image, H, color), H, s, t, keep, mirror, color)


def pair_rng(seed: int, pair_id: str) -> np.random.Generator:
    """An independent generator per pair: same seed and id, same pair, in any order."""
    digest = int.from_bytes(hashlib.sha1(pair_id.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


class SyntheticPairs(PairDataset):
    """``--dataset synthetic --root DIR``: seeded warps of the images in DIR.

    Source images are split by a hash of their relative path (80 / 10 / 10, at least one
    image in val and test), so the splits never share a source image and adding images
    only moves those near the boundaries.
    """

    name = "synthetic"
    pairs_from_root = True
    splits = ("trn", "val", "test")
    base_rule = "image"

    def __init__(self, root: str | Path, cfg: WarpConfig = WarpConfig(), seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        super().__init__(root)

    def layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return "image folder does not exist"
        if len(list_images(self.root)) < 3:
            return "synthetic pairs need at least 3 images (disjoint trn / val / test sources)"
        return None

    def split_file(self, split: str) -> Path | None:
        return self.root

    def expected_split_file(self, split: str) -> str:
        return "images"

    def split_images(self) -> dict[str, list[str]]:
        rels = [p.relative_to(self.root).as_posix() for p in list_images(self.root)]
        ranked = sorted(rels, key=lambda r: hashlib.sha1(r.encode()).hexdigest())
        n = len(ranked)
        n_test = max(1, round(0.1 * n))
        n_val = max(1, round(0.1 * n))
        parts = {"test": ranked[:n_test], "val": ranked[n_test : n_test + n_val], "trn": ranked[n_test + n_val :]}
        return {k: sorted(v) for k, v in parts.items()}

    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        out = []
        for rel in self.split_images()[split]:
            size = self.image_size(rel)
            for k in range(self.cfg.pairs_per_image):
                out.append(self.make_record(rel, size, f"{rel}#{k}"))
        return out

    def make_record(self, rel: str, size: tuple[int, int], pair_id: str) -> PairRecord:
        """Draw the warp of one pair (no pixels are rendered: the record holds the warp)."""
        rng = pair_rng(self.seed, pair_id)
        try:
            H, mirror, color, s, t, _ = draw_pair_geometry(size, rng, self.cfg, grid_points(size, self.cfg.grid))
        except ValueError as e:
            raise DataError(self.root / rel, str(e)) from None
        parent = Path(rel).parent.as_posix()
        return PairRecord(
            id=pair_id,
            category=parent if parent != "." else "image",
            src=rel,
            trg=rel,
            src_size=size,
            trg_size=size,
            src_kps=s,
            trg_kps=t,
            src_bbox=None,
            trg_bbox=None,
            pck_base=pck_bases("image", size, t, None),
            meta={"synthetic": {"homography": H.tolist(), "mirror": mirror, "color": list(color), "seed": self.seed}},
        )
