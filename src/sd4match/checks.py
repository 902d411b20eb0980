"""Input checks that run before any model loads: each names the first problem in one line.

Every command validates what it was given (pictures, points files, dataset root and layout,
prompt folder, device, output folder, model source) in seconds, so a typo never costs a
model load or a download attempt.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from sd4match.config import category_names
from sd4match.data import open_dataset
from sd4match.data.images import NO_IMAGES, image_size, list_images, load_image
from sd4match.errors import Sd4MatchError, Sd4MatchWarning
from sd4match.features import sd_limits, sd_source, split_fused
from sd4match.features.sd import parse_noise_schedule
from sd4match.features.registry import feature_width, resolve
from sd4match.prompts import PromptSpec, check_prompt, parse_prompt  # ``empty``, ``text:...`` or a readable prompt folder -> its PromptSpec
from sd4match.prompts.base import read_prompt_config
from sd4match.runtime import pick_device

__all__ = ["check_device", "check_diffusion_settings", "check_dino", "check_distinct_files", "check_image_folder", "check_model", "check_output_file", "check_output_folder", "check_picture", "check_picture_headers", "check_picture_name", "check_pictures", "check_prompt", "check_prompt_categories", "check_splits"]


def check_prompt_categories(prompt: str, categories) -> None:
    """A per-category prompt folder knows every category it will be asked for (as its lookup
    finds them: the name, its base name, PF-Willow's sub-classes by their PF-Pascal class);
    else one line naming those it lacks, before the model loads (not at the first pair). The
    prompt itself was checked by ``check_prompt`` already: its spec is only read here."""
    spec = parse_prompt(prompt)
    if spec.folder is None or not spec.requires_category:
        return
    known = set(read_prompt_config(spec.folder).categories)
    missing = sorted({c for c in categories if not any(n in known for n in category_names(c))})
    if missing:
        raise Sd4MatchError(f"--prompt {prompt}: has no learned prompt for {', '.join(missing)} (it knows {', '.join(sorted(known))})")


def check_diffusion_settings(model: str, *, timesteps=(), up_blocks=(), noise_schedules=(), resolution: int | None = None) -> None:
    """The diffusion settings fit the Stable Diffusion model they are for, told from its
    configs before it loads (a typo costs seconds, not a load or a 5 GB download): the noise
    schedule's names, the working size a multiple of the VAE's 8, each timestep and up block
    within the UNet's (where its configs can be read). Nothing is checked for effnet-lite0
    and DINOv2, which take none of them."""
    source = sd_source(model)
    if source is None:
        return
    for s in noise_schedules:
        parse_noise_schedule(s)
    if resolution and resolution % 8:
        raise Sd4MatchError(f"--resolution {resolution}: Stable Diffusion's working size must be a multiple of 8 (the VAE's factor)")
    limits = sd_limits(source)
    if limits is None:
        return
    n_up, n_t = limits
    bad_t = [t for t in timesteps if not 0 <= t < n_t]
    if bad_t:
        raise Sd4MatchError(f"--timestep {bad_t[0]}: {model} is noised at t in 0..{n_t - 1}")
    bad_k = [k for k in up_blocks if not 0 <= k < n_up]
    if bad_k:
        raise Sd4MatchError(f"--up-block {bad_k[0]}: {model}'s UNet has up_blocks 0..{n_up - 1}")


def check_device(name: str):
    """The torch device ``name`` names, or a one-line refusal naming what is available."""
    return pick_device(name)


def check_picture(path: str | Path, *, decode: bool = True) -> tuple[int, int]:
    """A readable picture of at least 2 x 2: decoded in full (a truncated file is found), or
    with ``decode=False`` from its header only. Returns its stored (W, H)."""
    if decode:
        return load_image(path).size
    return image_size(path)


def check_image_folder(folder: str | Path, flag: str = "--images", *, exclude: str | Path | None = None) -> list[Path]:
    """The pictures under ``folder`` (``list_images``, none under ``exclude``); a missing
    folder, or one without pictures, named with its flag."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Sd4MatchError(f"{flag} {folder}: no such folder")
    files = list_images(folder, exclude=exclude)
    if not files:
        raise Sd4MatchError(f"{flag} {folder}: {NO_IMAGES}")
    return files


def check_picture_headers(files) -> None:
    """Every file is a picture of at least 2 x 2 by its header (seconds for thousands; a
    truncated file is still found when it is decoded); else one line naming the first bad
    one, how many are bad and the next few, so one run shows what to fix."""
    problems = []
    for f in files:
        try:
            image_size(f)
        except Sd4MatchError as e:
            problems.append(str(e))
    if problems:
        more = "" if len(problems) == 1 else f" (and {len(problems) - 1} more bad picture(s): " + "; ".join(problems[1:4]) + ("; ..." if len(problems) > 4 else "") + ")"
        raise Sd4MatchError(problems[0] + more)


def check_model(model: str) -> None:
    """``--model`` names something that can exist (registry name, hub id, folder or file, or
    ``SD+DINOv2``)."""
    for part in split_fused(model) or (model,):
        resolve(part)


def check_prompt_fits_model(model: str, spec: PromptSpec, flag: str) -> None:
    """effnet-lite0 and DINOv2 take no prompt: any but the empty one is named before the
    model loads (it was refused after the load: a DINOv2 download first)."""
    if not spec.is_empty and sd_source(model) is None:
        raise Sd4MatchError(f"{model} takes no prompt: {flag} would change nothing; leave it out")


def check_output_file(path: str | Path, flag: str = "--out", example: str = "out.json") -> Path:
    """``path`` can be written as a file: not a folder, its folder writable (or makeable)."""
    path = Path(path)
    if path.is_dir():
        raise Sd4MatchError(f"{flag} {path}: is a folder; name a file in it (e.g. {path / example})")
    _check_writable_folder(next((p for p in path.parents if p.exists()), Path(".")), path, flag)
    return path


def _file_key(path: Path):
    """What tells two names of one file apart from names of two: the inode where the file
    exists (links, symlinks and ``..`` alike), else the resolved path."""
    try:
        st = path.stat()
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


def check_distinct_files(outputs, inputs=()) -> None:
    """No output file (``(flag, path)``, path None when not given) is a file the command
    reads (``inputs``, the same shape), which writing it would replace, nor the file of
    another output; else one line, before anything is read or written."""
    seen: dict = {}
    for flag, path in inputs:
        if path is not None:
            seen.setdefault(_file_key(Path(path)), (flag, True))
    for flag, path in outputs:
        if path is None:
            continue
        key = _file_key(Path(path))
        if key in seen:
            other, read = seen[key]
            what = "what it reads" if read else f"{other}'s output"
            raise Sd4MatchError(f"{flag} {path}: is the file {other} {'reads' if read else 'writes'}; writing it would replace {what}: name another file")
        seen[key] = (flag, False)


def picture_suffixes(kind: str = "pillow") -> set[str]:
    """The file name suffixes a picture can be written as: Pillow's formats (``pillow``) or
    matplotlib's (``plot``: also .pdf, .svg, .eps)."""
    if kind == "plot":
        from matplotlib.backend_bases import FigureCanvasBase

        return {f".{k}" for k in FigureCanvasBase.get_supported_filetypes()}
    from PIL import Image

    Image.init()
    return {s for s, f in Image.registered_extensions().items() if f in Image.SAVE}


def check_picture_name(path: str | Path, flag: str, kind: str = "pillow") -> None:
    """``path``'s suffix names a format the picture can be written in (none: PNG)."""
    suffix = Path(path).suffix.lower()
    if suffix and suffix not in picture_suffixes(kind):
        common = ".png, .pdf, .svg" if kind == "plot" else ".png, .jpg, .webp"
        raise Sd4MatchError(f"{flag} {path}: cannot write a {suffix} picture; name a {common} file")


def check_output_folder(out: str | Path, flag: str = "--out") -> Path:
    """``out`` is a folder (or can be made): not an existing file, nor under one, its nearest
    existing folder writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Sd4MatchError(f"{flag} {out}: exists and is not a folder")
    _check_writable_folder(out if out.exists() else next((p for p in out.parents if p.exists()), Path(".")), out, flag)
    return out


def _check_writable_folder(folder: Path, asked: Path, flag: str) -> None:
    """``folder``, the nearest existing one of ``asked`` (what ``flag`` names), can hold new files."""
    if not folder.is_dir():
        raise Sd4MatchError(f"{flag} {asked}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise Sd4MatchError(f"{flag} {asked}: {folder} is not writable")


def check_splits(name: str, root: str | Path, splits, *, pictures: bool = False, options: dict | None = None) -> dict:
    """Open the dataset (with its reader ``options``) and read the pair lists of ``splits``:
    {split: records}; with ``pictures``, every picture those pairs read must exist
    (``check_pictures``)."""
    ds = open_dataset(name, root, **(options or {}))
    got = {s: ds.pairs(s) for s in splits}
    if pictures:
        check_pictures(root, [r for recs in got.values() for r in recs])
    return got


def check_pictures(root: str | Path, records) -> None:
    """Every picture the pairs read exists (existence only, in seconds for SPair-71k's 70k
    files; decoding stays with ``sd4match datasets check``); else one line naming the first
    missing one and how many are missing."""
    root = Path(root)
    rels = dict.fromkeys(rel for r in records for rel in r.files)
    missing = [rel for rel in rels if not os.path.isfile(root / rel)]
    if missing:
        more = f" ({len(missing)} of the {len(rels)} pictures these pairs read are missing; `sd4match datasets check` lists them)" if len(missing) > 1 else ""
        raise Sd4MatchError(f"{root / missing[0]}: image file is missing{more}")


DEFAULT_DINO = "dinov2-b"


def check_dino(spec: PromptSpec, given: str | None) -> str:
    """``--dino``: as given (with a warning when the prompt folder records another DINOv2),
    else the DINOv2 the CPM prompt was trained with (its ``dino_model``), else dinov2-b.
    A recorded one that is not on this machine is named before any model loads."""
    if spec.folder is None or not spec.needs_dino:
        return given or DEFAULT_DINO
    cfg = read_prompt_config(spec.folder)
    width = feature_width(given) if given is not None else None
    if width is not None and cfg.dino_dim and width != cfg.dino_dim:
        raise Sd4MatchError(f"--dino {given}: gives {width}-d tokens, and the prompt {spec.folder} takes {cfg.dino_dim}-d ones"
                            + (f" (it was trained with DINOv2 {cfg.dino_model})" if cfg.dino_model else ""))
    recorded = cfg.dino_model
    if recorded in (None, "", "unknown"):
        return given or DEFAULT_DINO

    def same(a: str, b: str) -> bool:  # a registry name and its hub id name the same weights
        try:
            return a == b or resolve(a).model_id == resolve(b).model_id
        except Sd4MatchError:
            return False

    if given is not None:
        if not same(given, recorded):
            warnings.warn(f"--dino {given}: the prompt {spec.folder} was trained with DINOv2 {recorded}; its tokens may differ", Sd4MatchWarning, stacklevel=2)
        return given
    if same(recorded, DEFAULT_DINO):
        return DEFAULT_DINO
    try:
        resolve(recorded)
    except Sd4MatchError as e:
        raise Sd4MatchError(f"--prompt {spec.folder}: trained with DINOv2 {recorded}, which is not here ({e}); pass --dino") from None
    return recorded
