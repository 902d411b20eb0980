"""Match points between your own images: the library behind ``sd4match match``,
``sd4match transfer`` and ``sd4match serve``.

Coordinates are continuous pixels of the picture as it is shown (EXIF orientation
applied; pixel i covers [i, i + 1), its centre is i + 0.5), in the original resolution
even when a very large image is downscaled before the model. Each image's random draws
(latent sample, noise) are seeded by ``seed`` and the image's content, so the same
image gives the same features in every command, in any order.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sd4match.batching import Batcher, Picture, per_pair
from sd4match.config import MatchConfig
from sd4match.data.images import fit_within, list_images, load_image, oriented_size
from sd4match.data.coco import picture_of, read_coco_keypoints
from sd4match.errors import DataError, Sd4MatchError, Sd4MatchWarning
from sd4match.features.base import rgb_image
from sd4match.fileio import atomic_write_text, read_user_text, staged_dir
from sd4match.matching import MATCH_RULES, border_contrast, dense_match, match_pixels, point_correlation
from sd4match.metrics import alpha_key, pck_correct
from sd4match.prompts import prompt_fingerprint, resolve_prompt
from sd4match.store import Store, image_key
from sd4match.version import __version__
from sd4match.viz import caption, contact_sheet, draw_matches, draw_pca, draw_points, overlay_heat, score_legend, score_range

SHEET_TILE = 320  # pixel height of each picture of a transfer's sheet.png
#: targets on one page of a transfer's sheet (with the source: 12 rows of 4); more go on
#: sheet-2.png, sheet-3.png, ... (one sheet of a thousand targets is ~90,000 px tall: no viewer opens it)
SHEET_TARGETS = 47
#: the sources a sheet page shows (the first ones) before its targets, however many there are
SHEET_SOURCES = 4

MAX_SIDE = 2048  # larger pictures are downscaled before the model (which works at 768 or less)


@dataclass(frozen=True)
class UserImage:
    """A decoded picture: ``image`` (RGB, at most ``max_side`` a side) and ``size`` (W, H) of the original."""

    image: Image.Image
    size: tuple[int, int]
    name: str
    key: str  # content hash of ``image``

    @property
    def scale(self) -> float:
        """Working pixels per original pixel (1 unless downscaled)."""
        return self.image.width / self.size[0]


def open_image(path: str | Path, *, max_side: int = MAX_SIDE) -> UserImage:
    """Decode ``path`` for matching: any PIL mode to RGB, EXIF orientation applied, downscaled
    to ``max_side``. Missing, empty, corrupt, 1 x 1 or non-image files raise a ``DataError``
    naming the file."""
    img = load_image(path, exif_transpose=True, max_side=max_side)  # names the file if it is missing, corrupt or tiny
    size = oriented_size(path)
    return UserImage(img, size, str(path), image_key(img))


def as_user_image(image, *, max_side: int = MAX_SIDE) -> UserImage:
    """What ``Matcher`` takes as a picture: a ``UserImage`` as it is, a path (``open_image``),
    or a picture in memory: a PIL image of any mode or a uint8 array (H, W[, 3 or 4]), whose
    pixels are taken as they are (no EXIF orientation: coordinates refer to them) and whose
    size is the original for coordinates (downscaled to ``max_side`` for the model only)."""
    if isinstance(image, UserImage):
        return image
    if isinstance(image, (str, Path)):
        return open_image(image, max_side=max_side)
    if not isinstance(image, (Image.Image, np.ndarray)):
        raise Sd4MatchError(f"a picture is a path, a PIL image, a uint8 array or what open_image returns, not a {type(image).__name__}")
    img = rgb_image(image)  # PIL mode or uint8 array -> RGB, as the featurizers take them
    if img.width < 2 or img.height < 2:
        raise Sd4MatchError(f"image is {img.width}x{img.height} pixels, too small to match")
    size = img.size
    img = fit_within(img, max_side)
    return UserImage(img, size, str(getattr(image, "filename", "") or "image"), image_key(img))


# -- points -------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_points(spec: str) -> list[tuple[str, tuple[float, float]]]:
    """``"x,y;x,y"`` (names ``p0, p1, ...``), JSON text, or a JSON file of named points -> [(name, (x, y))].

    JSON (a file, or the text itself when it starts with ``{`` or ``[``) may hold
    ``{"name": [x, y], ...}``, ``[[x, y], ...]``, ``[{"name", "x", "y"}, ...]``, either under a
    ``"points"`` key (a ``transfer`` output: its points on that image, less those marked
    ``"reliable": false``), or a ``matches.json`` written by ``sd4match match`` (its source
    points). A name given twice is an error.
    """
    text = spec.strip()
    if text[:1] in ("{", "["):
        return _points_from_data(_json_points(text, "--points"), "--points")
    if spec.lower().endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise Sd4MatchError(f"{path}: points file is missing")
        return _points_from_data(_json_points(read_user_text(path), str(path)), str(path))
    out = []
    for i, part in enumerate(p.strip() for p in spec.split(";") if p.strip()):
        m = re.fullmatch(rf"({_NUM})\s*,\s*({_NUM})", part)
        if not m:
            raise Sd4MatchError(f"--points: {part!r} is not 'x,y' (points are separated by ';', e.g. \"120,80;300.5,42\", "
                                "or give JSON: a file or '{\"name\": [x, y], ...}')")
        out.append((f"p{i}", (float(m.group(1)), float(m.group(2)))))
    if not out:
        raise Sd4MatchError("--points: no points given")
    return out


def _json_points(text: str, where: str):
    """JSON text -> its data; a key given twice in one object is an error (``json`` keeps the last)."""
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: dict(_unique_names(pairs, where)))
    except json.JSONDecodeError as e:
        raise Sd4MatchError(f"{where}: not valid JSON ({e})") from None


def _points_from_data(data, where: str) -> list[tuple[str, tuple[float, float]]]:
    if isinstance(data, dict) and isinstance(data.get("points"), (list, dict)):  # a transfer JSON, or {"points": ...}
        data = data["points"]
    elif isinstance(data, dict) and isinstance(data.get("matches"), list):  # a matches.json: its source points
        data = data["matches"]
    items: list = []
    doubtful = 0
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, dict) and v.get("reliable") is False:  # failed its forward-backward check: no seed for another transfer
                doubtful += 1
            elif isinstance(v, dict) and "source" in v:  # a matches.json point
                items.append((str(v.get("name", f"p{i}")), v["source"]))
            elif isinstance(v, dict):
                items.append((str(v.get("name", f"p{i}")), [v.get("x"), v.get("y")]))
            else:
                items.append((f"p{i}", v))
    out = []
    for name, xy in items:
        if not (isinstance(xy, (list, tuple)) and len(xy) == 2 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in xy)):
            raise Sd4MatchError(f"{where}: point {name!r} is {xy!r}, not [x, y]")
        out.append((name, (float(xy[0]), float(xy[1]))))
    if not out:
        raise Sd4MatchError(f"{where}: holds no points" + (f" (its {doubtful} marked \"reliable\": false are left out)" if doubtful else ""))
    return _unique_names(out, where)


def _unique_names(points: list[tuple[str, Any]], where: str) -> list[tuple[str, Any]]:
    """Points are told apart by name (in the outputs, the sheet and the next --points): one name, one point."""
    seen = set()
    for name, _ in points:
        if name in seen:
            raise Sd4MatchError(f"{where}: point {name!r} is given twice")
        seen.add(name)
    return points


def named_points(points) -> list[tuple[str, tuple[float, float]]]:
    """Points as the Python API takes them -> [(name, (x, y))]: named, ``[("left eye", (x, y)),
    ...]`` or ``{"left eye": (x, y), ...}``, or unnamed, ``[(x, y), ...]`` or an (N, 2) array or
    tensor (named ``p0, p1, ...`` as on the command line)."""
    if isinstance(points, dict):
        items = [(str(k), v) for k, v in points.items()]
    else:
        items = [(p[0], p[1]) if isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) else (f"p{i}", p) for i, p in enumerate(points)]
    out = []
    for name, xy in items:
        try:
            if isinstance(xy, (str, bytes)):
                raise TypeError(xy)
            x, y = (float(c) for c in xy)
        except (TypeError, ValueError):
            raise Sd4MatchError(f"point {name!r} is {xy!r}, not (x, y)") from None
        out.append((name, (x, y)))
    return _unique_names(out, "points")


def check_points_within(points: Sequence[tuple[str, tuple[float, float]]], name: str, size: Sequence[int]) -> None:
    """Every point must lie inside the picture ``name`` of ``size`` = (W, H): 0 <= x <= W, 0 <= y <= H."""
    w, h = size
    for pname, (x, y) in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise Sd4MatchError(f"point {pname} ({x:g}, {y:g}) is not a position: its coordinates must be finite numbers")
        if not (0 <= x <= w and 0 <= y <= h):
            raise Sd4MatchError(f"point {pname} ({x:g}, {y:g}) lies outside {name} ({w}x{h} pixels)")


def check_points(points: Sequence[tuple[str, tuple[float, float]]], img: UserImage) -> None:
    """Every point must lie inside the picture: 0 <= x <= W, 0 <= y <= H."""
    check_points_within(points, img.name, img.size)


# -- the matcher ----------------------------------------------------------------------------


class Matcher:
    """Features of user images under one model and prompt, kept by image content.

    Args:
        featurizer: any ``Featurizer`` (SD, effnet-lite0, DINOv2).
        prompt: ``"empty"``, ``"text:<words>"`` or a prompt folder (single, category, cpm).
        category: the category for ``category`` prompts and templates with ``{category}``.
        dino: the DINOv2 featurizer a CPM prompt needs.
        rule, temperature, sigma: the match rule (``sd4match.matching.match``).
        seed: base seed of every image's latent sample and noise.
        cache_bytes: memory kept for feature maps, VAE posteriors and DINOv2 tokens.
        cache_dir: also keep them on disk (the ``Store`` folder: safetensors keyed by image
            content, model settings, prompt and seed), so a later run skips their extraction.
    """

    def __init__(self, featurizer, prompt: str = "empty", *, category: str | None = None, dino=None, rule: str = "kernel-softargmax",
                 temperature: float = 0.04, sigma: float = 7.0, similarity: str = "cosine", seed: int = 0, cache_bytes: int = 1 << 30,
                 cache_dir: str | Path | None = None):
        if rule not in MATCH_RULES:
            raise Sd4MatchError(f"unknown match rule {rule!r}; expected one of {', '.join(MATCH_RULES)}")
        self.featurizer, self.dino = featurizer, dino
        self.prompt_spec, self.category = prompt, category
        self.match = MatchConfig(rule, temperature, sigma, similarity)
        self.seed = seed
        self.prompt = resolve_prompt(prompt, featurizer, dino=dino)
        self.store = Store(cache_bytes, cache_dir)
        # interactive use: calls as large as the work at hand (no padding to a fixed batch)
        self.batcher = Batcher(featurizer, dino=dino, store=self.store, seed=seed, fixed_batches=False)
        self._emb = None
        if self.prompt is not None and not per_pair(self.prompt):
            if self.prompt.requires_category and not category:
                raise Sd4MatchError(f"--prompt {prompt}: this prompt needs --category")
            if not self.prompt.per_picture_condition:  # else each picture's own, made with its map
                self._emb = self.batcher.embeds(self.prompt, category if self.prompt.requires_category else None)
        self._prompt_id = self.batcher.prompt_id(self.prompt, category, fingerprint=prompt_fingerprint(self.prompt))

    rule = property(lambda self: self.match.rule)
    temperature = property(lambda self: self.match.temperature)
    sigma = property(lambda self: self.match.sigma)

    def settings(self) -> dict:
        return {"model": self.featurizer.settings(), "prompt": self.prompt_spec, "category": self.category, "rule": self.rule,
                "temperature": self.temperature, "sigma": self.sigma, "similarity": self.match.similarity, "seed": self.seed}

    @staticmethod
    def _picture(img: UserImage) -> Picture:
        return Picture(img.image, img.key)

    @property
    def pair_dependent(self) -> bool:
        """Whether a picture's map depends on its partner (a per-pair prompt, e.g. CPM)."""
        return per_pair(self.prompt)

    def store_keys(self, a: UserImage, b: UserImage | None = None) -> list[str]:
        """The store keys (kind ``features``) of the maps ``features(a, b)`` returns (of ``a`` alone without ``b``)."""
        a, b = as_user_image(a), None if b is None else as_user_image(b)
        return self.batcher.map_keys(self.prompt, self._prompt_id, self._picture(a), None if b is None else self._picture(b))

    def is_cached(self, a: UserImage, b: UserImage | None = None) -> bool:
        """Whether the maps ``features(a, b)`` returns are stored (in memory or on disk)."""
        a, b = as_user_image(a), None if b is None else as_user_image(b)
        return all(self.batcher.has_stored("features", k) for k in self.store_keys(a, b))

    def features(self, a: UserImage, b: UserImage) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, h, w) maps of ``a`` and ``b``; a per-pair prompt (CPM) is built from both images."""
        a, b = as_user_image(a), as_user_image(b)
        return self.batcher.pair_maps(self.prompt, self._picture(a), self._picture(b), prompt_id=self._prompt_id, embeds=self._emb)

    def match_points(self, a: UserImage, b: UserImage, points) -> list[dict]:
        """Each point of ``a`` -> ``{"name", "source": [x, y], "target": [x, y], "score",
        "back": [x, y], "cycle": c}`` in original pixels: ``back`` is the target matched back
        into ``a`` (the same maps, the same rule) and ``cycle`` its distance from the source
        point as a fraction of ``a``'s longer side (the forward-backward check: a reliable
        match comes back near where it started). ``points``: ``[(name, (x, y)), ...]``,
        ``{name: (x, y)}``, or unnamed ``[(x, y), ...]`` / an (N, 2) array (named ``p0, p1,
        ...``). ``a`` and ``b``: as ``open_image`` gives them, paths, PIL images or uint8
        arrays (``as_user_image``)."""
        a, b = as_user_image(a), as_user_image(b)
        points = named_points(points)
        check_points(points, a)
        fa, fb = self.features(a, b)
        kps = torch.tensor([xy for _, xy in points], dtype=torch.float32)
        out = match_pixels(self.featurizer, fa, fb, kps, a.size, b.size, self.rule, **self.match.kwargs())
        back = match_pixels(self.featurizer, fb, fa, out["kps"].float(), b.size, a.size, self.rule, **self.match.kwargs())["kps"]
        tk, sc, bk = (t.double().cpu().numpy() for t in (out["kps"], out["scores"], back))
        cycle = np.linalg.norm(bk - kps.double().numpy(), axis=1) / max(a.size)
        return [{"name": n, "source": [round(x, 2), round(y, 2)], "target": [round(float(t[0]), 2), round(float(t[1]), 2)], "score": round(float(s), 4),
                 "back": [round(float(k[0]), 2), round(float(k[1]), 2)], "cycle": round(float(c), 4)}
                for (n, (x, y)), t, s, k, c in zip(points, tk, sc, bk, cycle)]

    def similarity(self, a: UserImage, b: UserImage, point: tuple[float, float]) -> np.ndarray:
        """Cosine similarity of ``point`` (x, y) of ``a`` to every cell of ``b``: (h, w) in [-1, 1]."""
        a, b = as_user_image(a), as_user_image(b)
        (_, point), = named_points([("query", point)])
        check_points([("query", point)], a)
        fa, fb = self.features(a, b)
        cells = self.featurizer.cell_map(a.size).pixel_to_cell(torch.tensor([point], dtype=torch.float32, device=fa.device))[None]
        return point_correlation(fa, fb, cells, self.match.similarity)[0, 0].float().cpu().numpy()

    def auto_points(self, a: UserImage, b: UserImage, *, min_score: float = 0.0, max_points: int = 20) -> list[tuple[str, tuple[float, float]]]:
        """Source points for ``match`` without ``--points``: cells of ``a`` on the salient object
        whose nearest neighbour in ``b`` is mutual and also on the object there, spread out.

        Saliency is ``border_contrast`` (cells unlike the picture's border); candidates are
        ranked by cosine x saliency in ``a`` x saliency of the match in ``b``, then taken
        greedily at least ``max(h, w) / 8`` cells apart (then ``/ 16``, if too few remain).
        """
        a, b = as_user_image(a), as_user_image(b)
        fa, fb = self.features(a, b)
        d = dense_match(fa, fb, "nn", similarity=self.match.similarity)
        h, w = fa.shape[-2:]
        hb, wb = fb.shape[-2:]
        sal_a, sal_b = border_contrast(fa)[0].reshape(-1), border_contrast(fb)[0].reshape(-1)
        cells = d["cells"][0].round().long()
        matched = (cells[:, 1] * wb + cells[:, 0]).clamp(0, hb * wb - 1)
        on_object = (sal_a >= 0.7) & (sal_b[matched] >= 0.7)
        keep = d["mutual"][0] & (d["scores"][0] >= min_score)
        if int((keep & on_object).sum()) >= min(3, max_points):
            keep = keep & on_object
        rank = d["scores"][0] * sal_a * sal_b[matched]
        idx = torch.nonzero(keep).flatten()
        idx = idx[torch.argsort(rank[idx], descending=True, stable=True)].tolist()
        chosen: list[int] = []
        for gap in (max(h, w) / 8, max(h, w) / 16):  # spread first, then closer points; never two on one spot
            for i in idx:
                if len(chosen) >= max_points:
                    break
                if i in chosen:
                    continue
                if all((i % w - j % w) ** 2 + (i // w - j // w) ** 2 >= gap**2 for j in chosen):
                    chosen.append(i)
        centres = torch.tensor([[i % w, i // w] for i in chosen], dtype=torch.float32).reshape(-1, 2)  # cell i is centred at the integer i
        px = self.featurizer.cell_map(a.size).cell_to_pixel(centres).cpu().numpy()
        return [(f"p{i}", (round(float(x), 2), round(float(y), 2))) for i, (x, y) in enumerate(px)]

    def dense(self, a: UserImage, b: UserImage) -> dict[str, np.ndarray]:
        """For every cell of ``b``: its location in ``a`` (original pixels) and a confidence.

        Returns ``{"source_xy": (h, w, 2), "score": (h, w), "mutual": (h, w) bool}`` on ``b``'s grid.
        """
        a, b = as_user_image(a), as_user_image(b)
        fa, fb = self.features(a, b)
        h, w = fb.shape[-2:]
        d = dense_match(fb, fa, self.rule, **self.match.kwargs())
        xy = self.featurizer.cell_map(a.size).cell_to_pixel(d["cells"][0]).float().cpu().numpy()
        return {"source_xy": xy.reshape(h, w, 2), "score": d["scores"][0].float().cpu().numpy().reshape(h, w),
                "mutual": d["mutual"][0].cpu().numpy().reshape(h, w)}


def warp_onto(a: UserImage, b: UserImage, dense: dict[str, np.ndarray], cell_map_b, cell_map_a) -> Image.Image:
    """``a`` moved onto ``b``'s pixels (working resolution) cell by cell: each pixel of ``b``
    takes the cell it lies in (the nearest cell centre), and reads ``a`` at that cell's match
    plus its own offset from the cell centre (scaled by the two pictures' cell sizes), so each
    cell is a shifted piece of ``a``, never a blend of neighbours that matched far apart.
    Only cells with a mutual match are moved; the others show ``b`` in grey.

    ``cell_map_b`` and ``cell_map_a`` are the featurizer's ``cell_map(b.size)`` and ``cell_map(a.size)``.
    """
    wb, hb = b.image.size
    h, w = dense["source_xy"].shape[:2]
    ys, xs = torch.meshgrid(torch.arange(hb, dtype=torch.float64) + 0.5, torch.arange(wb, dtype=torch.float64) + 0.5, indexing="ij")
    px = torch.stack([xs / b.scale, ys / b.scale], dim=-1)  # centres of the working pixels, in b's original pixels
    cells = cell_map_b.pixel_to_cell(px)
    ci = cells.round().long()
    ci[..., 0].clamp_(0, w - 1)
    ci[..., 1].clamp_(0, h - 1)
    centre = cell_map_b.cell_to_pixel(ci.double())  # each pixel's cell centre, in b's original pixels
    src_xy = torch.from_numpy(dense["source_xy"]).double()[ci[..., 1], ci[..., 0]]  # that cell's match in a
    # a's pixels per cell against b's: an offset from the cell centre keeps its size in cells
    unit = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    per = (cell_map_a.cell_to_pixel(unit).diff(dim=0) / cell_map_b.cell_to_pixel(unit).diff(dim=0))[0]
    ax = src_xy[..., 0] + (px[..., 0] - centre[..., 0]) * per[0]
    ay = src_xy[..., 1] + (px[..., 1] - centre[..., 1]) * per[1]
    grid = torch.stack([ax / a.size[0] * 2 - 1, ay / a.size[1] * 2 - 1], dim=-1)[None].float()
    src = torch.from_numpy(np.asarray(a.image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    moved = F.grid_sample(src, grid, mode="bilinear", align_corners=False, padding_mode="border")[0].permute(1, 2, 0).numpy()
    mutual = torch.from_numpy(np.asarray(dense["mutual"], dtype=bool))[ci[..., 1], ci[..., 0]].numpy()
    grey = np.asarray(b.image.convert("L"), dtype=np.float32)[..., None] / 255.0 * 0.5 + 0.25  # b, faded to mid-grey
    out = np.where(mutual[..., None], moved, np.repeat(grey, 3, axis=2))
    return Image.fromarray((out * 255 + 0.5).clip(0, 255).astype(np.uint8))


# -- what the commands write ---------------------------------------------------------------


def _describe(img: UserImage, path) -> dict:
    return {"path": str(path), "size": list(img.size), "working_size": list(img.image.size)}


def run_match(matcher: Matcher, src: str | Path, trg: str | Path, out: str | Path, *, points: Sequence | None = None, dense: bool = False,
              min_score: float = 0.0, max_points: int = 20, max_side: int = MAX_SIDE, max_cycle: float | None = None) -> dict:
    """``sd4match match``: write ``matches.json`` and ``matches.png`` (and with ``dense``,
    ``warped.png``, ``confidence.png``, ``pca.png`` and ``dense.npz``) into ``out``; return the JSON.

    Without ``points``, the source points are the mutual nearest neighbours (``auto_points``).
    With ``max_cycle``, each match has ``"reliable"`` (its cycle at most that; the JSON records
    ``max_cycle``) and one that fails is drawn hollow at both ends.
    Everything is computed before anything is written, so a bad input leaves ``out`` as it was.
    """
    check_max_cycle(max_cycle)
    a, b = open_image(src, max_side=max_side), open_image(trg, max_side=max_side)
    if points is not None:
        check_points(points, a)
    mode = "points" if points is not None else "mutual-nn"
    if points is None:
        points = matcher.auto_points(a, b, min_score=min_score, max_points=max_points)
    matches = mark_reliable(matcher.match_points(a, b, points) if points else [], max_cycle)
    result = {"format": "sd4match-matches-1", "source": _describe(a, src), "target": _describe(b, trg), "points_from": mode,
              **({"max_cycle": max_cycle} if max_cycle is not None else {}), "matches": matches, "settings": matcher.settings(), "model": matcher.featurizer.model_id, "sd4match": __version__,
              "coordinates": "continuous pixels of the EXIF-oriented original picture; pixel i spans [i, i + 1)"}
    pictures = {"matches.png": draw_matches(a.image, b.image, a.size, b.size, matches, labels=len(matches) <= 20)}
    arrays = None
    if dense:
        d = matcher.dense(a, b)
        pictures["warped.png"] = caption(warp_onto(a, b, d, matcher.featurizer.cell_map(b.size), matcher.featurizer.cell_map(a.size)),
                                         f"A's pixels moved onto B, cell by cell, through the {int(d['mutual'].sum())} mutual matches "
                                         f"({100 * float(d['mutual'].mean()):.0f}% of B's cells); grey: B where no cell matches mutually.")
        pictures["confidence.png"] = caption(overlay_heat(b.image, d["score"], title="match score:"),
                                             "How well each cell of B is matched in A: the similarity of its best match (its own range, "
                                             "from the lowest cell to the highest), over B.")
        pictures["pca.png"] = draw_pca([(f"A: {Path(src).name}", a.image), (f"B: {Path(trg).name}", b.image)], [f[0] for f in matcher.features(a, b)],
                                       title=matcher.featurizer.model_id)
        arrays = d
        result["dense"] = {"grid": list(d["score"].shape), "mean_score": round(float(d["score"].mean()), 4), "mutual_fraction": round(float(d["mutual"].mean()), 4),
                           "files": ["warped.png", "confidence.png", "pca.png", "dense.npz"]}
    with staged_dir(out) as stage:  # all files or none: an earlier run's files stay until these are complete
        for name, pic in pictures.items():
            pic.save(stage / name, format="PNG")
        if arrays is not None:
            with open(stage / "dense.npz", "wb") as fh:
                np.savez_compressed(fh, **arrays)
        (stage / "matches.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


#: the COCO keypoints file of a transfer (``coco.json``): no target's JSON takes its name
COCO_STEM = "coco"
#: the targets a ``--skip-bad`` transfer passed over, with their problems (written only when there are some)
SKIPPED_STEM = "skipped"
#: a transfer's leave-one-out check over its sources (``--check``)
CHECK_STEM = "check"


def _target_names(targets: Sequence[Path], root: Path) -> list[str]:
    """Each target's output name (``<name>.json``): its path under ``root`` with ``__`` for
    ``/``; with its extension where two share a stem (or a stem is ``coco``, ``skipped`` or
    ``check``, the transfer's own files), then a number where names still meet (``a/x.jpg`` and ``a__x.jpg``):
    one file per target, always."""
    stems = [t.relative_to(root).with_suffix("").as_posix().replace("/", "__") for t in targets]
    own = {COCO_STEM, SKIPPED_STEM, CHECK_STEM}
    dup = {s for s in stems if stems.count(s) > 1} | own
    names = [(s + "_" + t.suffix.lstrip(".").lower()) if s in dup else s for s, t in zip(stems, targets)]
    taken: set[str] = set()
    for i, n in enumerate(names):
        k, name = 1, n
        while name in taken or name in own:
            k += 1
            name = f"{n}_{k}"
        names[i] = name
        taken.add(name)
    return names


def coco_keypoints(found: Sequence[tuple[str, tuple[int, int], list]], names: Sequence[str], category: str | None, *,
                   max_cycle: float | None = None) -> dict:
    """A transfer as COCO keypoints (``coco.json``, for annotation tools): one image per target
    (``file_name`` relative to ``--targets``, its original size), one category whose
    ``keypoints`` are the point names, one annotation per target with every point as
    ``[x, y, 2]`` (placed: a transfer has no visibility), its ``bbox`` the points' tight box
    ``[x, y, w, h]`` and ``area`` that box's (no object outline is known), and each point's
    match score and forward-backward cycle under ``sd4match_scores`` and ``sd4match_cycles``.

    With ``max_cycle``, a point whose cycle exceeds it is left for the annotator: ``[0, 0, 0]``
    (COCO's "not labelled"), outside ``num_keypoints`` and the box (``[0, 0, 0, 0]`` when no
    point is kept); its score and cycle stay listed."""
    images, annotations = [], []
    for i, (file_name, (w, h), matches) in enumerate(found, 1):
        keep = [reliable(m, max_cycle) for m in matches]
        xy = np.array([m["target"] for m, k in zip(matches, keep) if k], dtype=np.float64).reshape(-1, 2)
        x0, y0 = xy.min(axis=0) if len(xy) else (0.0, 0.0)
        bw, bh = xy.max(axis=0) - (x0, y0) if len(xy) else (0.0, 0.0)
        points = [(*m["target"], 2) if k else (0, 0, 0) for m, k in zip(matches, keep)]
        images.append({"id": i, "file_name": file_name, "width": int(w), "height": int(h)})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "keypoints": [v for p in points for v in p],
                            "num_keypoints": len(xy), "bbox": [float(x0), float(y0), float(bw), float(bh)], "area": float(bw * bh), "iscrowd": 0,
                            "sd4match_scores": [m["score"] for m in matches], "sd4match_cycles": [m["cycle"] for m in matches]})
    return {"info": {"description": "sd4match transfer", "version": __version__}, "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": category or "object", "supercategory": category or "object", "keypoints": list(names), "skeleton": []}]}


def reliable(match: dict, max_cycle: float | None) -> bool:
    """Whether a match passes the forward-backward check: its ``cycle`` is at most
    ``max_cycle`` (every match passes without a threshold)."""
    return max_cycle is None or match["cycle"] <= max_cycle


def check_max_cycle(max_cycle: float | None) -> None:
    """A cycle threshold is a fraction of the source's longer side above 0 (or None: none)."""
    if max_cycle is not None and not max_cycle > 0:
        raise Sd4MatchError(f"max_cycle {max_cycle}: a cycle threshold is a fraction of the source's longer side above 0")


def mark_reliable(matches: list[dict], max_cycle: float | None) -> list[dict]:
    """``matches`` each with ``"reliable"`` (``reliable``) when there is a threshold; as they are without."""
    return matches if max_cycle is None else [{**m, "reliable": reliable(m, max_cycle)} for m in matches]


def transfer_targets(targets: str | Path, source: str | Path | Sequence[str | Path], out: str | Path) -> list[Path]:
    """The pictures under ``targets`` a transfer places points on: not the source (nor any of
    several), and nothing under ``out`` (an earlier transfer's ``sheet.png`` when ``--out``
    lies inside ``--targets``)."""
    srcs = {Path(s).resolve() for s in ([source] if isinstance(source, (str, Path)) else source)}
    files = [p for p in list_images(targets, exclude=out) if p.resolve() not in srcs]
    if not files:
        raise Sd4MatchError(f"{targets}: no images to transfer onto")
    return files


def coco_sources(path: str | Path, images: str | Path) -> list[tuple[Path, list[tuple[str, tuple[float, float]]]]]:
    """The annotated pictures of a COCO keypoints file (an annotation tool's export, or a
    ``transfer``'s corrected ``coco.json``) as transfer sources: (``images / file_name``, its
    labelled points) for each annotation with a point of v > 0, named by its category's
    ``keypoints`` (``data.coco.read_coco_keypoints``). Two annotations of one picture (two
    animals) are two sources."""
    out = []
    for inst in read_coco_keypoints(path):
        points = [(n, (float(x), float(y))) for n, (x, y, _), keep in zip(inst.names, inst.points, inst.labelled) if keep]
        if points:
            out.append((picture_of(inst, images, path), points))
    if not out:
        raise DataError(path, "holds no labelled keypoint (v > 0)")
    return out


def best_of_sources(per_source: Sequence[list[dict]], names: Sequence[str]) -> list[dict]:
    """One match per point name from several sources' matches of one target (each source's
    list holds the names it has): the one whose forward-backward ``cycle`` is smallest, then
    the higher ``score``, then the earlier source; each with ``"from"``, its source's index."""
    out = []
    for name in names:
        cands = [(m["cycle"], -m["score"], k, m) for k, ms in enumerate(per_source) for m in ms if m["name"] == name]
        *_, k, m = min(cands, key=lambda c: c[:3])
        out.append({**m, "from": k})
    return out


#: the thresholds of a transfer's leave-one-out check (``check_sources``)
CHECK_ALPHAS = (0.05, 0.1, 0.15)


def check_sources(matcher: Matcher, pics: Sequence[UserImage], point_sets: Sequence[list], alphas: Sequence[float] = CHECK_ALPHAS, *,
                  max_cycle: float | None = None) -> dict:
    """How well a transfer from these sources places points, measured on the sources: each
    one's points predicted from the others as a target's are (``best_of_sources``), and
    scored against its own: PCK@alpha with max(W, H) of its picture as the base, over all
    points and per point name. A name no other source has is not checked. With
    ``max_cycle``, also the share of points that pass the forward-backward check and their
    PCK (``"reliable"``): what the threshold keeps, and how good what it keeps is."""
    names = list(dict.fromkeys(n for ps in point_sets for n, _ in ps))
    rows, per_source = [], []
    for k, (b, truth) in enumerate(zip(pics, point_sets)):
        others = [(a, ps) for j, (a, ps) in enumerate(zip(pics, point_sets)) if j != k]
        have = {n for _, ps in others for n, _ in ps}
        found = {m["name"]: m for m in best_of_sources([matcher.match_points(a, b, ps) for a, ps in others], [n for n in names if n in have])}
        checked = [(n, xy) for n, xy in truth if n in found]
        if not checked:
            per_source.append({"path": b.name, "points": []})
            continue
        pred, gt = np.array([found[n]["target"] for n, _ in checked], dtype=np.float64), np.array([xy for _, xy in checked], dtype=np.float64)
        err = np.linalg.norm(pred - gt, axis=1) / max(b.size)
        rows += [(n, ok, reliable(found[n], max_cycle)) for (n, _), ok in zip(checked, pck_correct(pred, gt, max(b.size), alphas))]
        per_source.append({"path": b.name, "points": [{"name": n, "error": round(float(e), 4), "predicted": found[n]["target"], "cycle": found[n]["cycle"]}
                                                      for (n, _), e in zip(checked, err)]})
    if not rows:
        raise Sd4MatchError("no point of one source is named in another: the check predicts each source's points from the others")

    def pck(verdicts):
        return {"n_points": len(verdicts), **{alpha_key(a): float(np.mean([v[i] for v in verdicts])) for i, a in enumerate(alphas)}}

    out = {"protocol": "leave-one-out over the sources: each source's points predicted from the others; "
                       "correct within alpha x max(W, H) of its picture", "alphas": list(alphas), "all": pck([ok for _, ok, _ in rows]),
           "by_point": {n: pck([ok for m, ok, _ in rows if m == n]) for n in names if any(m == n for m, _, _ in rows)}, "sources": per_source}
    if max_cycle is not None:
        kept = [ok for _, ok, keep in rows if keep]
        out["reliable"] = {"max_cycle": max_cycle, "share": len(kept) / len(rows), **(pck(kept) if kept else {"n_points": 0})}
    return out


def _target_doc(matcher: Matcher, src_doc: dict, b: UserImage, path: Path, matches: list[dict], max_cycle: float | None) -> dict:
    """A transfer's JSON of one target: its points (each with ``from`` when there are several
    sources, ``reliable`` with a ``max_cycle``), the source points they came from, the settings."""
    def origin(m):
        return {"from": m["from"]} if "sources" in src_doc else {}

    return {"format": "sd4match-transfer-1", **src_doc, "target": _describe(b, path),
            "points": [{"name": m["name"], "x": m["target"][0], "y": m["target"][1], "score": m["score"], "cycle": m["cycle"], **origin(m),
                        **({"reliable": m["reliable"]} if max_cycle is not None else {})} for m in matches],
            **({"max_cycle": max_cycle} if max_cycle is not None else {}),
            "source_points": [{"name": m["name"], "x": m["source"][0], "y": m["source"][1], **origin(m)} for m in matches],
            "settings": matcher.settings(), "model": matcher.featurizer.model_id, "sd4match": __version__}


#: the format of the file an unfinished transfer keeps its targets in (``transfer_partial``)
PARTIAL_FORMAT = "sd4match-transfer-partial-1"


def transfer_partial(out: str | Path) -> Path:
    """Where a transfer keeps each target it has done until it finishes: beside ``out`` (so
    that ``out`` stays as an earlier run left it), removed when the transfer is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.transfer-partial.jsonl"


class _KeptTargets:
    """What a transfer has done, a line a target beside ``out`` (``transfer_partial``) until it
    is complete: read back when the same transfer (``header``: sources, points, settings) runs
    again; another transfer's is dropped with a warning. A last line cut by a stop is left
    out (that target is done again)."""

    def __init__(self, out: Path, header: dict):
        self.path, self.done = transfer_partial(out), {}
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            try:
                same = json.loads(lines[0]) == header
            except (IndexError, ValueError):
                same = False
            if not same:
                warnings.warn(f"{self.path}: an unfinished transfer of other sources, points or settings; this one starts over",
                              Sd4MatchWarning, stacklevel=3)
            for line in lines[1:] if same else ():
                try:
                    d = json.loads(line)
                    self.done[(d["path"], d["key"])] = d["matches"]
                except (ValueError, KeyError, TypeError):
                    break
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(json.dumps(d) + "\n" for d in [header, *(self._line(*k, v) for k, v in self.done.items())]))
        self.file = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def _line(path: str, key: str, matches: list) -> dict:
        return {"path": path, "key": key, "matches": matches}

    def get(self, path: str, key: str) -> list | None:
        """The matches kept for the target at ``path`` (under --targets) with content ``key``."""
        return self.done.get((path, key))

    def add(self, path: str, key: str, matches: list) -> None:
        self.file.write(json.dumps(self._line(path, key, matches)) + "\n")
        self.file.flush()


def _sheet_pages(pics: Sequence[UserImage], point_sets: Sequence[list], views: Sequence[tuple], *, per_page: int, columns: int,
                 max_cycle: float | None) -> Iterator[tuple[str, Image.Image]]:
    """(file name, picture) of each page of a transfer's sheet, drawn one at a time: the first
    ``SHEET_SOURCES`` sources with their points in the top colour, then ``per_page`` of the
    ``views`` (name, small picture, original size, matches), one colour scale for all."""
    lo, hi = score_range([m["score"] for *_, ms in views for m in ms])
    src_tiles = [(f"source: {Path(a.name).name}", draw_points(a.image, a.size, [{"name": n, "source": list(xy), "score": hi} for n, xy in ps],
                                                                key="source", lo=lo, hi=hi, height=SHEET_TILE))
                 for a, ps in zip(pics[:SHEET_SOURCES], point_sets)]
    whose = "the sources' points" if len(pics) > 1 else "the source's points"
    if len(pics) > SHEET_SOURCES:
        whose += f"; the first {SHEET_SOURCES} of {len(pics)} sources shown"
    hollow = f"; hollow: cycle above {max_cycle:g}" if max_cycle is not None else ""
    pages = [views[i:i + per_page] for i in range(0, len(views), per_page)]
    for k, (page, fname) in enumerate(zip(pages, sheet_names(len(views), per_page)), 1):
        tiles = src_tiles + [(name, draw_points(im, size, ms, key="target", lo=lo, hi=hi, height=SHEET_TILE)) for name, im, size, ms in page]
        words = f"page {k} of {len(pages)}: " if len(pages) > 1 else ""
        yield fname, score_legend(contact_sheet(tiles, columns=columns, tile_height=SHEET_TILE), lo, hi,
                                  f"{words}score of each transferred point (cosine; {whose} in the top colour{hollow}):")


def run_transfer(matcher: Matcher, source: str | Path | Sequence[str | Path], points: Sequence, targets: str | Path, out: str | Path, *,
                 max_side: int = MAX_SIDE, progress: bool = True, sheet_columns: int = 4, sheet_targets: int = SHEET_TARGETS,
                 max_cycle: float | None = None, skip_bad: bool = False, check: bool = False) -> list[Path]:
    """``sd4match transfer``: place the named ``points`` of ``source`` on every image under
    ``targets``; write ``<name>.json`` per target, ``coco.json`` (all of them as COCO
    keypoints: ``coco_keypoints``) and ``sheet.png``; return the per-target JSON paths.

    Several sources: ``source`` a list of pictures and ``points`` a list of their point lists
    (a name may be on some of them only). Each target's point of a name is then the match from
    the source whose match of it comes back closest (``best_of_sources``); its JSON lists the
    ``sources`` and each point's ``from`` (an index into them) instead of one ``source``.

    With ``max_cycle``, a point whose forward-backward ``cycle`` exceeds it fails the check:
    ``"reliable": false`` in its target's JSON (which records ``max_cycle``), left unlabelled
    in ``coco.json`` and drawn hollow on the sheet.

    A target that cannot be read stops the transfer (naming it), unless ``skip_bad``: then
    it is passed over and listed, with its problem, in ``skipped.json``.

    With ``check`` (several sources), ``check.json`` says how well the sources place each
    other's points (``check_sources``): an estimate of the transfer's accuracy.

    The sheet shows the sources (the first ``SHEET_SOURCES``), then ``sheet_targets``
    targets a page: ``sheet.png``, then ``sheet-2.png``, ``sheet-3.png``, ... (each page with
    the sources first, one colour scale for all). Each source's features are extracted once,
    each target's once (a per-pair prompt, CPM: each source-target pair's maps once).
    Results are written into a staging folder and moved into ``out`` only when every target
    succeeded, so a failure leaves an earlier run's ``out`` byte for byte as it was; each
    target's matches are kept as it is done (``transfer_partial``), so the same call after a
    stop does only the targets left.
    """
    if sheet_targets < 1:
        raise Sd4MatchError(f"sheet_targets {sheet_targets}: a sheet shows at least one target")
    check_max_cycle(max_cycle)
    several = not isinstance(source, (str, Path))
    srcs, point_sets = (list(source), [named_points(ps) for ps in points]) if several else ([source], [named_points(points)])
    if len(srcs) != len(point_sets) or not srcs:
        raise Sd4MatchError(f"{len(srcs)} sources and {len(point_sets)} point lists: give each source its points")
    pics = [open_image(s, max_side=max_side) for s in srcs]
    for a, ps in zip(pics, point_sets):
        check_points(ps, a)
    names = list(dict.fromkeys(n for ps in point_sets for n, _ in ps))  # every name once, in the order first given
    if check and len(pics) < 2:
        raise Sd4MatchError("the check predicts each source's points from the other sources: give two or more")
    root = Path(targets)
    files = transfer_targets(root, srcs, out)
    out = Path(out)
    src_doc = {"sources": [_describe(a, s) for a, s in zip(pics, srcs)]} if several else {"source": _describe(pics[0], srcs[0])}
    # each target done is kept, a line each, until the transfer is complete: the same command continues a stopped one
    header = json.loads(json.dumps({"format": PARTIAL_FORMAT, "sources": [[a.key, ps] for a, ps in zip(pics, point_sets)], "max_side": max_side,
                                    "settings": matcher.settings(), "prompt": matcher._prompt_id, "model": matcher.featurizer.model_id}, default=str))
    kept = _KeptTargets(out, header)
    views: list[tuple[str, Image.Image, tuple, list]] = []  # small copies: the points are drawn once every score is known
    docs: dict[str, str] = {}
    found: list[tuple[str, tuple[int, int], list]] = []  # for coco.json
    skipped: list[dict] = []
    try:
        for path, name in tqdm(list(zip(files, _target_names(files, root))), unit="image", desc="transfer", disable=not progress):
            rel = path.relative_to(root).as_posix()
            try:
                b = open_image(path, max_side=max_side)
            except Sd4MatchError as e:
                if skip_bad:
                    skipped.append({"path": rel, "problem": getattr(e, "problem", str(e))})
                    continue
                raise Sd4MatchError(f"{e}; the {len(found)} targets done are kept: mend or remove the picture and run the same command again "
                                    "(or skip the pictures that cannot be read: --skip-bad)") from None
            best = kept.get(rel, b.key)
            if best is None:
                per_source = [matcher.match_points(a, b, ps) for a, ps in zip(pics, point_sets)]
                best = best_of_sources(per_source, names) if several else per_source[0]
                kept.add(rel, b.key, best)
            matches = mark_reliable(best, max_cycle)
            docs[f"{name}.json"] = json.dumps(_target_doc(matcher, src_doc, b, path, matches, max_cycle), indent=2)
            found.append((rel, b.size, matches))
            views.append((name, b.image.copy().reduce(max(1, b.image.height // SHEET_TILE)), b.size, matches))  # at least a tile tall
    finally:
        kept.file.close()
    checked = check_sources(matcher, pics, point_sets, max_cycle=max_cycle) if check else None
    if not views:
        raise Sd4MatchError(f"{root}: no target could be read ({len(skipped)} skipped: {skipped[0]['path']}: {skipped[0]['problem']}, ...)")
    with staged_dir(out) as stage:
        for fname, text in docs.items():
            (stage / fname).write_text(text, encoding="utf-8")
        coco = coco_keypoints(found, names, matcher.category, max_cycle=max_cycle)
        (stage / f"{COCO_STEM}.json").write_text(json.dumps(coco, indent=1), encoding="utf-8")
        if skipped:
            (stage / f"{SKIPPED_STEM}.json").write_text(json.dumps(skipped, indent=1), encoding="utf-8")
        if checked is not None:
            (stage / f"{CHECK_STEM}.json").write_text(json.dumps(checked, indent=1), encoding="utf-8")
        for fname, sheet in _sheet_pages(pics, point_sets, views, per_page=sheet_targets, columns=sheet_columns, max_cycle=max_cycle):
            sheet.save(stage / fname, format="PNG")
    kept.path.unlink(missing_ok=True)
    return [out / fname for fname in docs]


def sheet_names(n_targets: int, per_page: int = SHEET_TARGETS) -> list[str]:
    """The files of a transfer's sheet for ``n_targets`` targets, ``per_page`` a page:
    sheet.png, sheet-2.png, ..."""
    return ["sheet.png" if k == 1 else f"sheet-{k}.png" for k in range(1, -(-n_targets // per_page) + 1)]
