"""Image headers and decoding with one-line errors naming the file."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sd4match.errors import DataError
from sd4match.fileio import OUTPUT_MARKS
from sd4match.pixels import to_rgb  # noqa: F401  (also imported from here)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: what a folder without pictures is told
NO_IMAGES = "no images found (looked for .jpg, .jpeg, .png, .bmp, .webp, .tif)"


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


def exif_orientation(path: str | Path) -> int | None:
    """The EXIF orientation tag of a readable picture (1: as stored; 2 to 8: mirrored or
    turned when shown), None without one; read from the header (``image_size`` names a
    missing or unreadable file first)."""
    with Image.open(path) as im:
        value = im.getexif().get(0x0112)
    return int(value) if isinstance(value, int) else None


def fit_within(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` downscaled (aspect kept, Lanczos) so that neither side exceeds ``max_side``;
    as it is when it fits (or without ``max_side``)."""
    if not max_side or max(img.size) <= max_side:
        return img
    f = max_side / max(img.size)
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)


def load_image(path: str | Path, *, exif_transpose: bool = False, max_side: int | None = None) -> Image.Image:
    """Decode an image fully into RGB.

    Args:
        path: image file.
        exif_transpose: apply the EXIF orientation (for users' photos; never for
            benchmark images, whose annotations refer to the stored pixels).
        max_side: downscale (aspect kept) so that neither side exceeds this; JPEGs are
            decoded at a reduced scale directly. The caller keeps the original size for
            coordinates (``oriented_size``).

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
                if max_side and max(im.size) > max_side:
                    f = max_side / max(im.size)
                    im.draft("RGB", (max(1, int(im.width * f)), max(1, int(im.height * f))))  # JPEG: decode at 1/2, 1/4 or 1/8
                im.load()
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                img = fit_within(to_rgb(im), max_side)
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(path, f"cannot decode image ({e})") from None
    if img.width < 2 or img.height < 2:
        raise DataError(path, f"image is {img.width}x{img.height} pixels, too small to match")
    return img


def oriented_size(path: str | Path, *, exif_transpose: bool = True) -> tuple[int, int]:
    """(W, H) as the user sees the picture: the header size, swapped for EXIF orientations 5-8."""
    w, h = image_size(path)
    if exif_transpose:
        try:
            with Image.open(path) as im:
                orientation = im.getexif().get(0x0112, 1)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(path, f"cannot read EXIF data ({e})") from None
        if orientation in (5, 6, 7, 8):
            return h, w
    return w, h


def list_images(folder: str | Path, *, exclude: str | Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path; none under
    ``exclude`` (a command's output folder inside ``folder``: the pictures it drew there are
    not inputs of its next run), nor in a folder below ``folder`` that sd4match wrote into
    (one holding a run's lock or an output's manifest, ``fileio.OUTPUT_MARKS``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "image folder is missing")
    skip = Path(exclude).resolve() if exclude is not None else None
    found, runs = [], set()
    for p in folder.rglob("*"):
        if p.name in OUTPUT_MARKS and p.parent != folder:
            runs.add(p.parent.relative_to(folder).parts)
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            found.append(p)
    # nothing from a folder sd4match wrote into below this one (a sweep's plots, a transfer's sheet): its pictures are not inputs
    return sorted((p for p in found if not any(p.relative_to(folder).parts[:len(r)] == r for r in runs) and (skip is None or skip not in p.resolve().parents)),
                  key=lambda p: p.relative_to(folder).as_posix())
