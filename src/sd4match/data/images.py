"""Image headers and decoding with one-line errors naming the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sd4match.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of the stored pixel array, read from the file header only (no decoding).

    EXIF orientation is *not* applied: benchmark annotations refer to the stored pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        raise DataError(path, f"cannot read image header ({e})") from None
    if w < 2 or h < 2:
        raise DataError(path, f"image is {w}x{h} pixels, too small to match")
    return int(w), int(h)


def load_image(path: str | Path, *, exif_transpose: bool = False) -> Image.Image:
    """Decode an image fully into RGB.

    Args:
        path: image file.
        exif_transpose: apply the EXIF orientation (for users' photos; never for
            benchmark images, whose annotations refer to the stored pixels).

    Raises:
        DataError: missing, truncated, corrupt or degenerate file, named in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                img = to_rgb(im)
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(path, f"cannot decode image ({e})") from None
    if img.width < 2 or img.height < 2:
        raise DataError(path, f"image is {img.width}x{img.height} pixels, too small to match")
    return img


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grayscale, 16-bit, palette, RGBA (on white), CMYK."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray((a * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "image folder is missing")
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
