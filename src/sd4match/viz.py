"""Pictures of matches: side-by-side lines, similarity heat maps, contact sheets.

Points are given in original pixels of each picture together with its original size;
pictures are drawn at a display size of at most ``height`` pixels tall and
``MAX_ASPECT`` times that wide.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sd4match.fileio import atomic_path


def pyplot():
    """matplotlib's pyplot on the file backend (Agg, unless one is already chosen): plots
    are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def confidence_colour(score: float, lo: float = 0.0, hi: float = 1.0) -> tuple[int, int, int]:
    """Red (low) through yellow to green (high), for a score in [lo, hi]."""
    t = float(np.clip((score - lo) / max(hi - lo, 1e-9), 0.0, 1.0))
    r = 1.0 if t < 0.5 else 2.0 * (1.0 - t)
    g = 2.0 * t if t < 0.5 else 1.0
    return int(r * 230), int(g * 200), 40


def colormap(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(h, w) values -> (h, w, 3) uint8 through matplotlib's 'turbo' map."""
    from matplotlib import colormaps

    lo = float(np.min(values)) if lo is None else lo
    hi = float(np.max(values)) if hi is None else hi
    t = np.clip((values - lo) / max(hi - lo, 1e-9), 0, 1)
    return (colormaps["turbo"](t)[..., :3] * 255 + 0.5).astype(np.uint8)


#: the narrowest score range a colour scale spans: scores closer than this are drawn alike, not red and green
MIN_SPAN = 0.1


def score_range(scores: Sequence[float]) -> tuple[float, float]:
    """The colour scale of a set of scores: their own range, widened around its middle to at
    least ``MIN_SPAN`` (two matches at 0.241 and 0.244 are the same colour, on a 0.19-0.29 bar)."""
    if not len(scores):
        return 0.0, 1.0
    lo, hi = float(min(scores)), float(max(scores))
    if hi - lo < MIN_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
    return lo, hi


def caption(img: Image.Image, text: str) -> Image.Image:
    """``img`` with ``text`` in a band below it (wrapped to the picture's width)."""
    font = _font(max(11, min(16, img.width // 45)))
    probe = ImageDraw.Draw(img)
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if probe.textlength(trial, font=font) > img.width - 12 and line:
            lines.append(line)
            line = w
        else:
            line = trial
    lines.append(line)
    lh = int(font.size * 1.35) if hasattr(font, "size") else 14
    out = Image.new("RGB", (img.width, img.height + lh * len(lines) + 8), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, ln in enumerate(lines):
        draw.text((6, img.height + 4 + i * lh), ln, fill=(0, 0, 0), font=font)
    return out


#: the widest a picture is drawn, in multiples of the drawing's height: a panorama or a strip
#: is shrunk to fit, never drawn tens of thousands of pixels wide
MAX_ASPECT = 3.0


def _fit(img: Image.Image, height: int) -> Image.Image:
    """``img`` scaled to ``height`` rows, or further down (aspect kept) where it would be wider
    than ``MAX_ASPECT * height``."""
    f = min(height / img.height, MAX_ASPECT * height / img.width)
    return img.convert("RGB").resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _mark(draw: ImageDraw.ImageDraw, x: float, y: float, r: int, colour, name: str | None, font, *, hollow: bool = False) -> None:
    """A filled dot of radius ``r`` at (x, y) (``hollow``: a ring in ``colour`` between black
    edges, the picture seen through it), with ``name`` beside it when given."""
    if hollow:
        w = max(2, r // 2)
        for rad, col, width in ((r + 2, (0, 0, 0), w + 2), (r + 1, colour, w)):  # black edges, then the colour between them
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], outline=col, width=width)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))
    if name:
        draw.text((x + r + 1, y - r - 1), name, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


class _Labels:
    """Places text boxes that neither overlap each other nor leave their panel."""

    def __init__(self, draw: ImageDraw.ImageDraw, font):
        self.draw, self.font, self.boxes = draw, font, []

    def place(self, x: float, y: float, r: int, text: str, panel: tuple[float, float, float, float]) -> bool:
        l, t, rr, b = self.draw.textbbox((0, 0), text, font=self.font, stroke_width=2)
        tw, th = rr - l, b - t
        px0, py0, px1, py1 = panel
        for dx, dy in ((r + 2, -th - 1), (r + 2, 1), (-tw - r - 2, -th - 1), (-tw - r - 2, 1), (-tw / 2, -th - r - 2), (-tw / 2, r + 2),
                       (r + 2, -th / 2), (-tw - r - 2, -th / 2)):
            box = (x + dx, y + dy, x + dx + tw, y + dy + th)
            if box[0] < px0 or box[1] < py0 or box[2] > px1 or box[3] > py1:
                continue
            if any(not (box[2] <= o[0] or box[0] >= o[2] or box[3] <= o[1] or box[1] >= o[3]) for o in self.boxes):
                continue
            self.boxes.append(box)
            self.draw.text((box[0] - l, box[1] - t), text, fill=(255, 255, 255), font=self.font, stroke_width=2, stroke_fill=(0, 0, 0))
            return True
        return False  # no free place: the dot stays unlabelled (matches.json has every name)


def _legend(canvas: Image.Image, lo: float, hi: float, title: str, colour_of, height: int = 30) -> Image.Image:
    """``canvas`` with a band below it: ``title`` and a gradient from ``lo`` to ``hi`` through ``colour_of``."""
    out = Image.new("RGB", (canvas.width, canvas.height + height), (255, 255, 255))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    font = _font(max(10, height // 2 - 2))
    y0 = canvas.height + 5
    bar_h = height - 10
    lo_text = f"{lo:.2f}"
    draw.text((6, y0), title, fill=(0, 0, 0), font=font)
    x = 6 + draw.textlength(title, font=font) + 8
    draw.text((x, y0), lo_text, fill=(0, 0, 0), font=font)
    x0 = int(x + draw.textlength(lo_text, font=font) + 6)
    bar_w = max(40, min(260, canvas.width - x0 - 60))
    for i in range(bar_w):
        draw.line([(x0 + i, y0), (x0 + i, y0 + bar_h)], fill=colour_of(lo + (hi - lo) * i / max(bar_w - 1, 1)))
    draw.rectangle([x0, y0, x0 + bar_w, y0 + bar_h], outline=(0, 0, 0))
    draw.text((x0 + bar_w + 6, y0), f"{hi:.2f}", fill=(0, 0, 0), font=font)
    return out


def _side_by_side(src: Image.Image, trg: Image.Image, src_size: Sequence[int], trg_size: Sequence[int], height: int, gap: int):
    """(canvas, src drawn, trg drawn, src scale (x, y), trg scale): the two pictures at
    ``height`` side by side, ``gap`` apart; a point (x, y) of ``src_size`` pixels lands at
    (x·sx, y·sy), one of ``trg_size`` at (src drawn width + gap + x·tx, y·ty)."""
    a, b = _fit(src, height), _fit(trg, height)
    canvas = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    return canvas, a, b, (a.width / src_size[0], a.height / src_size[1]), (b.width / trg_size[0], b.height / trg_size[1])


def draw_matches(src: Image.Image, trg: Image.Image, src_size: Sequence[int], trg_size: Sequence[int], matches: Sequence[dict], *,
                 height: int = 480, labels: bool = True, gap: int = 8) -> Image.Image:
    """``src`` and ``trg`` side by side with a line per match, coloured by its score (red
    lowest to green highest of these matches, with a legend); labels never overlap each
    other or leave their picture.

    ``matches`` are ``{"name", "source": [x, y], "target": [x, y], "score"}`` in original pixels;
    one whose ``reliable`` is false is drawn hollow at both ends.
    """
    canvas, a, b, sa, sb = _side_by_side(src, trg, src_size, trg_size, height, gap)
    draw = ImageDraw.Draw(canvas)
    r = max(3, height // 120)
    font = _font(max(10, height // 40))
    scores = [float(m.get("score", 1.0)) for m in matches]
    lo, hi = score_range(scores)

    def colour(v):
        return confidence_colour(v, lo, hi)

    ends = []
    for m, sc in zip(matches, scores):
        (xs, ys), (xt, yt) = m["source"], m["target"]
        p = (xs * sa[0], ys * sa[1])
        q = (a.width + gap + xt * sb[0], yt * sb[1])
        draw.line([p, q], fill=colour(sc), width=max(1, r // 2))
        ends.append((p, q, colour(sc), str(m.get("name") or ""), m.get("reliable", True) is False))
    placer = _Labels(draw, font)
    for p, q, col, name, hollow in ends:
        for (x, y), panel in ((p, (0, 0, a.width, a.height)), (q, (a.width + gap, 0, a.width + gap + b.width, b.height))):
            _mark(draw, x, y, r, col, None, font, hollow=hollow)
            if labels and name:
                placer.place(x, y, r, name, panel)
    rings = "; hollow: failed the forward-backward check" if any(e[-1] for e in ends) else ""
    return _legend(canvas, lo, hi, f"match score (cosine{rings}):", colour) if matches else canvas


RIGHT, WRONG = (40, 190, 70), (230, 40, 40)


def draw_errors(src: Image.Image, trg: Image.Image, src_size: Sequence[int], trg_size: Sequence[int], src_kps, gt, pred, correct: Sequence[bool], *,
                height: int = 320, gap: int = 8) -> Image.Image:
    """A pair as scored: ``src`` with its keypoints numbered (0, 1, ... in annotation order),
    ``trg`` with each ground-truth point (white ring, the same number) and its prediction
    (a dot, green where ``correct``, red where not) joined by a line: the error drawn.
    Points are (x, y) in original pixels of ``src_size`` / ``trg_size``."""
    canvas, a, b, sa, sb = _side_by_side(src, trg, src_size, trg_size, height, gap)
    draw = ImageDraw.Draw(canvas)
    r = max(3, height // 80)
    font = _font(max(10, height // 28))
    placer = _Labels(draw, font)
    x0 = a.width + gap
    ends = [((xs * sa[0], ys * sa[1]), (x0 + xg * sb[0], yg * sb[1]), (x0 + xp * sb[0], yp * sb[1]), RIGHT if ok else WRONG)
            for (xs, ys), (xg, yg), (xp, yp), ok in zip(src_kps, gt, pred, correct)]
    for _, g, q, col in ends:
        draw.line([g, q], fill=col, width=max(1, r // 2))
    for i, (p, g, q, col) in enumerate(ends):
        _mark(draw, *p, r, (255, 255, 255), None, font)
        draw.ellipse([g[0] - r - 1, g[1] - r - 1, g[0] + r + 1, g[1] + r + 1], outline=(255, 255, 255), width=2)
        _mark(draw, *q, r, col, None, font)
        placer.place(*p, r, str(i), (0, 0, a.width, a.height))
        placer.place(*g, r + 1, str(i), (x0, 0, x0 + b.width, b.height))
    return canvas


def heat_image(values: np.ndarray, size: Sequence[int], lo: float | None = None, hi: float | None = None, *, colorbar: str | None = None) -> Image.Image:
    """``values`` (h, w) coloured (turbo), stretched to ``size`` = (W, H); with ``colorbar``
    (its title), a colour bar from ``lo`` to ``hi`` below the picture."""
    lo = float(np.min(values)) if lo is None else lo
    hi = float(np.max(values)) if hi is None else hi
    img = Image.fromarray(colormap(values, lo, hi)).resize(tuple(size), Image.Resampling.BILINEAR)
    if colorbar is None:
        return img
    return _legend(img, lo, hi, colorbar, _turbo(lo, hi))


def _turbo(lo: float, hi: float):
    """The colour ``colormap`` gives a value on the [lo, hi] scale (for colour bars)."""
    return lambda v: tuple(int(c) for c in colormap(np.array([[v]]), lo, hi)[0, 0])


def overlay_heat(photo: Image.Image, values: np.ndarray, *, title: str, alpha: float = 0.55) -> Image.Image:
    """``values`` (h, w) coloured in their own range over ``photo`` (translucent), with that
    range's colour bar and ``title`` below."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi - lo < 1e-6:
        lo, hi = lo - MIN_SPAN / 2, hi + MIN_SPAN / 2
    heat = Image.fromarray(colormap(values, lo, hi)).resize(photo.size, Image.Resampling.BILINEAR)
    img = Image.blend(photo.convert("RGB"), heat, alpha)
    return _legend(img, lo, hi, title, _turbo(lo, hi))


def contact_sheet(tiles: Sequence[tuple[str, Image.Image]], *, tile_height: int = 320, columns: int = 4, pad: int = 8) -> Image.Image:
    """Captioned pictures on a grid, ``columns`` per row."""
    font = _font(max(10, tile_height // 16))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # each cell as wide as its picture or its caption, each row as tall as its tallest picture (a strip is drawn short)
    cells = [(c, t, max(t.width, math.ceil(measure.textlength(c, font=font)))) for c, t in ((c, _fit(im, tile_height)) for c, im in tiles)]
    cap = max(12, tile_height // 12) + 4
    cols = max(1, min(columns, len(cells)))
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    heights = [max(t.height for _, t, _ in row) for row in rows]
    width = max(sum(w for _, _, w in row) + pad * (len(row) + 1) for row in rows)
    sheet = Image.new("RGB", (width, sum(h + cap + pad for h in heights) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for row, h in zip(rows, heights):
        x = pad
        for caption, t, w in row:
            sheet.paste(t, (x, y))
            draw.text((x, y + h + 2), caption, fill=(0, 0, 0), font=font)
            x += w + pad
        y += h + cap + pad
    return sheet


def draw_points(img: Image.Image, size: Sequence[int], points: Sequence[dict], *, height: int = 320, key: str = "target",
                lo: float = 0.0, hi: float = 1.0) -> Image.Image:
    """``img`` at ``height`` with named points (original pixels under ``key``) coloured by
    score on the [lo, hi] scale, hollow where a point's ``reliable`` is false; labels never
    overlap each other or leave the picture."""
    out = _fit(img, height)
    draw = ImageDraw.Draw(out)
    s = (out.width / size[0], out.height / size[1])
    r = max(4, height // 60)
    font = _font(max(11, height // 22))
    placer = _Labels(draw, font)
    marks = [(p[key][0] * s[0], p[key][1] * s[1], confidence_colour(p.get("score", 1.0), lo, hi), str(p.get("name", "")),
              p.get("reliable", True) is False) for p in points]
    for x, y, col, _, hollow in marks:
        _mark(draw, x, y, r, col, None, font, hollow=hollow)
    for x, y, _, name, _ in marks:
        if name:
            placer.place(x, y, r, name, (0, 0, out.width, out.height))
    return out


def score_legend(img: Image.Image, lo: float, hi: float, title: str = "match score (cosine):") -> Image.Image:
    """``img`` with the colour bar of ``confidence_colour`` on [lo, hi] below it."""
    return _legend(img, lo, hi, title, lambda v: confidence_colour(v, lo, hi))


def feature_pca(maps: Sequence, components: int = 3, *, normalise: bool = True, max_cells: int = 100_000,
                seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """A joint PCA of several (C, h, w) feature maps (arrays or tensors; grids may differ).

    Every cell of every map is one sample (L2-normalised first when ``normalise``, as the
    cosine the matchers use sees it); the axes are fitted to all maps' cells together
    (centred on their mean; at most ``max_cells`` cells drawn with ``seed`` when there are
    more), so a direction in feature space is the same axis in every picture. Each axis
    points so that its largest loading is positive (a fixed sign, as scikit-learn's
    ``svd_flip``).

    Returns:
        each map's cells projected on the first ``components`` axes, (h, w, components),
        and the share of the fitted cells' variance each axis explains.
    """
    flat = []
    for m in maps:
        a = m.detach().float().cpu().numpy() if hasattr(m, "detach") else np.asarray(m, dtype=np.float32)
        if a.ndim != 3:
            raise ValueError(f"a feature map is (C, h, w), got shape {tuple(a.shape)}")
        f = a.reshape(a.shape[0], -1).T.astype(np.float32)
        if normalise:
            f = f / (np.linalg.norm(f.astype(np.float64), axis=1, keepdims=True) + 1e-6).astype(np.float32)
        flat.append((f, a.shape[1:]))
    if not flat or len({f.shape[1] for f, _ in flat}) != 1:
        raise ValueError("feature_pca needs one or more maps of the same channel count")
    sizes = np.cumsum([0] + [len(f) for f, _ in flat])
    chosen = np.arange(sizes[-1])
    if sizes[-1] > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(sizes[-1], max_cells, replace=False))
    # the fitted cells' mean and covariance in float64, a block of rows at a time (never all cells in one array)
    dim = flat[0][0].shape[1]
    total, outer = np.zeros(dim), np.zeros((dim, dim))
    for i, (f, _) in enumerate(flat):
        rows = chosen[(chosen >= sizes[i]) & (chosen < sizes[i + 1])] - sizes[i]
        for j in range(0, len(rows), 8192):
            block = f[rows[j:j + 8192]].astype(np.float64)
            total += block.sum(axis=0)
            outer += block.T @ block
    mean = total / len(chosen)
    values, vectors = np.linalg.eigh(outer / len(chosen) - np.outer(mean, mean))
    order = np.argsort(values)[::-1][:components]
    axes = vectors[:, order]
    axes = axes * np.where(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])] < 0, -1.0, 1.0)
    share = np.clip(values[order], 0, None) / max(float(np.clip(values, 0, None).sum()), 1e-30)
    return [((f.astype(np.float64) - mean) @ axes).reshape(*hw, -1) for f, hw in flat], share


def pca_colours(projections: Sequence[np.ndarray], *, low: float = 1.0, high: float = 99.0) -> list[np.ndarray]:
    """``feature_pca``'s projections as (h, w, 3) uint8 pictures: axis 1, 2, 3 as red, green,
    blue, each stretched over the ``low``-th to ``high``-th percentile of all maps' cells
    together (one scale for every picture: the same colour is the same feature), clipped."""
    every = np.concatenate([p.reshape(-1, p.shape[-1]) for p in projections])[:, :3]
    lo, hi = np.percentile(every, low, axis=0), np.percentile(every, high, axis=0)
    out = []
    for p in projections:
        rgb = np.full(p.shape[:2] + (3,), 0.5)
        k = min(3, p.shape[-1])
        rgb[..., :k] = np.clip((p[..., :k] - lo[:k]) / np.maximum(hi[:k] - lo[:k], 1e-12), 0.0, 1.0)
        out.append((rgb * 255 + 0.5).astype(np.uint8))
    return out


def draw_pca(pictures: Sequence[tuple[str, Image.Image]], maps: Sequence, *, columns: int = 2, tile_height: int = 256,
             seed: int = 0, title: str = "") -> Image.Image:
    """A sheet of each picture beside its feature map's joint PCA (``feature_pca``,
    ``pca_colours``): the map's cells stretched over the picture as drawn (nearest, so each
    cell is one block of one colour), ``columns`` pictures a row, and a caption naming the
    axes' shares of the variance."""
    projections, share = feature_pca(maps, seed=seed)
    tiles = []
    for (name, img), rgb in zip(pictures, pca_colours(projections)):
        shown = _fit(img, tile_height)
        tiles += [(name, shown), (f"{name}: PCA", Image.fromarray(rgb).resize(shown.size, Image.Resampling.NEAREST))]
    shares = ", ".join(f"{100 * s:.1f}%" for s in share)
    text = (f"{title + ': ' if title else ''}joint PCA of the feature maps of {len(pictures)} pictures (each cell's descriptor L2-normalised): "
            f"axes 1-3 as red, green, blue ({shares} of the variance), one scale for all, so the same colour is the same feature in every picture")
    return caption(contact_sheet(tiles, tile_height=tile_height, columns=2 * columns), text)


#: the validation score a training run logs with its step (``scalars.jsonl``)
VAL_KEY = "val_pck@0.1"


def training_curves(records: Sequence[dict]) -> dict | None:
    """What ``plot_training`` draws, from a run's ``scalars.jsonl`` records: ``steps`` and
    ``loss`` of every logged step; ``window`` (about 2% of the steps, at least 1) and
    ``mean``, the running mean of the last ``window`` losses at ``steps[window - 1:]``;
    ``val_steps`` and ``val`` (PCK@0.1, fractions) of each validation and ``best``, the index
    of the best (the first of equal ones, as ``best/`` keeps it), or None without one. None
    without a logged step."""
    logged = [r for r in records if "loss" in r]
    if not logged:
        return None
    loss = np.array([r["loss"] for r in logged], dtype=np.float64)
    w = max(1, len(loss) // 50)
    val = [(r["step"], r[VAL_KEY]) for r in records if VAL_KEY in r]
    return {"steps": np.array([r["step"] for r in logged], dtype=np.int64), "loss": loss, "window": w,
            "mean": np.convolve(loss, np.ones(w) / w, mode="valid"),
            "val_steps": np.array([s for s, _ in val], dtype=np.int64), "val": np.array([v for _, v in val], dtype=np.float64),
            "best": int(np.argmax([v for _, v in val])) if val else None}


def plot_training(records: Sequence[dict], path, *, title: str = "", validation: str = "validation") -> Path | None:
    """``path`` (PNG): a training run's ``scalars.jsonl`` records drawn (``training_curves``):
    the loss of every step (faint) with its running mean, and, below, the validation PCK@0.1
    at each validation with the best marked (``validation`` says how it was scored). None
    (nothing written) without a logged step."""
    c = training_curves(records)
    if c is None:
        return None
    plt = pyplot()
    val = c["best"] is not None
    fig, axes = plt.subplots(2 if val else 1, 1, figsize=(8, 6 if val else 3.4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot(c["steps"], c["loss"], color="tab:blue", alpha=0.25 if c["window"] > 1 else 0.9, linewidth=0.8, label="loss of each step")
    if c["window"] > 1:
        ax.plot(c["steps"][c["window"] - 1:], c["mean"], color="tab:blue", linewidth=1.6, label=f"mean of the last {c['window']} steps")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    if val:
        b, vs, vp = c["best"], c["val_steps"], 100 * c["val"]
        ax = axes[1, 0]
        ax.plot(vs, vp, "o-", color="tab:green", markersize=3, label=validation)
        ax.plot([vs[b]], [vp[b]], "*", color="tab:red", markersize=12, label=f"best: {vp[b]:.2f} at step {vs[b]} (best/)")
        ax.set_ylabel("validation PCK@0.1 per image (%)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
