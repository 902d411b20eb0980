"""Pictures of matches: side-by-side lines, similarity heat maps, contact sheets.

Points are given in original pixels of each picture together with its original size;
pictures are drawn at a display size of at most ``height`` pixels tall.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


def _fit(img: Image.Image, height: int) -> Image.Image:
    w = max(1, round(img.width * height / img.height))
    return img.convert("RGB").resize((w, height), Image.Resampling.BICUBIC)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _mark(draw: ImageDraw.ImageDraw, x: float, y: float, r: int, colour, name: str | None, font) -> None:
    """A filled dot of radius ``r`` at (x, y), with ``name`` beside it when given."""
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))
    if name:
        draw.text((x + r + 1, y - r - 1), name, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def draw_matches(src: Image.Image, trg: Image.Image, src_size: Sequence[int], trg_size: Sequence[int], matches: Sequence[dict], *,
                 height: int = 480, labels: bool = True, gap: int = 8) -> Image.Image:
    """``src`` and ``trg`` side by side with a line per match, coloured by its score.

    ``matches`` are ``{"name", "source": [x, y], "target": [x, y], "score"}`` in original pixels.
    """
    a, b = _fit(src, height), _fit(trg, height)
    canvas = Image.new("RGB", (a.width + gap + b.width, height), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    sa, sb = (a.width / src_size[0], height / src_size[1]), (b.width / trg_size[0], height / trg_size[1])
    r = max(3, height // 120)
    font = _font(max(10, height // 40))
    for m in matches:
        (xs, ys), (xt, yt) = m["source"], m["target"]
        p = (xs * sa[0], ys * sa[1])
        q = (a.width + gap + xt * sb[0], yt * sb[1])
        col = confidence_colour(m.get("score", 1.0))
        draw.line([p, q], fill=col, width=max(1, r // 2))
        for x, y in (p, q):
            _mark(draw, x, y, r, col, str(m["name"]) if labels and m.get("name") else None, font)
    return canvas


def heat_image(values: np.ndarray, size: Sequence[int], lo: float | None = None, hi: float | None = None) -> Image.Image:
    """``values`` (h, w) coloured, stretched to ``size`` = (W, H)."""
    return Image.fromarray(colormap(values, lo, hi)).resize(tuple(size), Image.Resampling.BILINEAR)


def contact_sheet(tiles: Sequence[tuple[str, Image.Image]], *, tile_height: int = 240, columns: int = 4, pad: int = 6) -> Image.Image:
    """Captioned pictures on a grid, ``columns`` per row."""
    tiles = [(c, _fit(im, tile_height)) for c, im in tiles]
    font = _font(max(10, tile_height // 16))
    cap = max(12, tile_height // 12) + 4
    cols = max(1, min(columns, len(tiles)))
    rows = [tiles[i:i + cols] for i in range(0, len(tiles), cols)]
    width = max(sum(t.width for _, t in row) + pad * (len(row) + 1) for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (tile_height + cap + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for row in rows:
        x = pad
        for caption, t in row:
            sheet.paste(t, (x, y))
            draw.text((x, y + tile_height + 2), caption, fill=(0, 0, 0), font=font)
            x += t.width + pad
        y += tile_height + cap + pad
    return sheet


def draw_points(img: Image.Image, size: Sequence[int], points: Sequence[dict], *, height: int = 240, key: str = "target") -> Image.Image:
    """``img`` at ``height`` with named points (original pixels under ``key``) coloured by score."""
    out = _fit(img, height)
    draw = ImageDraw.Draw(out)
    s = (out.width / size[0], height / size[1])
    r = max(3, height // 60)
    font = _font(max(10, height // 20))
    for p in points:
        x, y = p[key][0] * s[0], p[key][1] * s[1]
        col = confidence_colour(p.get("score", 1.0))
        _mark(draw, x, y, r, col, str(p.get("name", "")), font)
    return out
