"""The ``sd4match`` command: parses arguments, checks the inputs, then calls the library.

Every command checks what it was given (pictures, points, dataset root and layout,
prompt folder, device, output folder) before it loads any model. Errors print one line
``sd4match: error: <file or pair>: <problem>`` and exit with status 2; ``--debug`` shows
the traceback instead.

The stages' flags are made from their settings' dataclasses (``sd4match.config``: each
field's help, type, choices and default, written once there). Library modules are
imported inside the commands, so that ``sd4match --help`` needs no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import typing
import warnings
from pathlib import Path
from typing import Any, Sequence

from sd4match.config import (ALL_PAIRS_HELP, compile_choice, kernel_choice, DEFAULT_ALPHAS, EVAL_PRESETS, IMAGES_HELP, MATCH_RULES, PROTOCOL_HELP, SPLIT_HELP, TRAIN_PRESETS, DatasetName, dataset_name,
                             EvalConfig, ImportKind, MatchConfig,
                             ModelConfig, Protocol, TrainConfig, field_base_type, field_choices, parse_alphas, parse_names, unused_rule_settings)
from sd4match.errors import RunStopped, Sd4MatchError, Sd4MatchWarning

__all__ = ["EVAL_PRESETS", "MATCH_RULES", "build_parser", "main"]

DATASET_NAMES = typing.get_args(DatasetName)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, once; flags without one (required, off
    switches, unset options) show none."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "(default" in text or action.required or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {d})"


def _version() -> str:
    from sd4match.version import __version__, package_version

    def v(name):
        return package_version(name) or "not installed"

    return f"sd4match {__version__} (torch {v('torch')}, diffusers {v('diffusers')}, transformers {v('transformers')})"


def _parser_type(fn):
    """``fn`` as an argparse type: its ValueError becomes argparse's one-line usage error."""

    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def add_config_flags(target, cls, *, only: Sequence[str] | None = None, unset: bool = False, defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of the settings dataclass ``cls`` (its metadata: help, flag name,
    choices, parser, how the default is worded).

    Args:
        target: a parser or argument group.
        only: the fields to make flags of (default: all but those with ``cli=False``).
        unset: every flag's value is None unless given (the stage layers presets and files
            under the flags); its help still names the field's default.
        defaults: defaults that differ for this command.
    """
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True) or (only is not None and f.name not in only):
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else
                                       f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = m.get("required") or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        base = field_base_type(cls, f)
        kw: dict[str, Any] = {"dest": f.name, "help": m.get("help", "")}
        shown = m.get("default_text") or default
        if base is bool:
            if unset or default:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
        else:
            choices = field_choices(cls, f)
            if m.get("parse") is not None:
                kw["type"] = _parser_type(m["parse"])
            elif choices is not None:
                kw["choices"] = choices
                if m.get("spelling") is not None:
                    kw["type"] = m["spelling"]
            elif base in (int, float, str):
                kw["type"] = base
            if required:
                kw["required"] = True
        if not required:
            kw["default"] = None if unset else default
            if (unset or m.get("default_text")) and shown is not None and shown is not False:
                kw["help"] += f" (default: {shown})"
        target.add_argument("--" + (m.get("flag") or f.name.replace("_", "-")), **kw)


def _number(cast, *, at_least: float | None = None, above: float | None = None, at_most: float | None = None):
    """An argparse ``type`` for a flag that is no config field: a whole (``int``) or finite
    (``float``) number within its bounds, refused in argparse's one line otherwise."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if cast is int else 'number'}") from None
        if cast is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"{text} must be at least {at_least:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text} must be above {above:g}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"{text} must be at most {at_most:g}")
        return value

    return parse


def config_from_args(cls, args, **given):
    """An instance of ``cls`` from the parsed flags (fields without a flag keep their defaults)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**kw, **given})


def _dataset_args(p: argparse.ArgumentParser, split: bool = True) -> None:
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES, type=dataset_name, help="benchmark name (synthetic: seeded warps of the pictures in --root)")
    p.add_argument("--root", required=True, type=Path, help="the dataset's own top folder (see the README's Datasets section)")
    p.add_argument("--images", type=Path, help=IMAGES_HELP)
    p.add_argument("--all-pairs", action="store_true", help=ALL_PAIRS_HELP)
    if split:
        p.add_argument("--split", required=True, help=SPLIT_HELP)


def _model_args(p: argparse.ArgumentParser, *, only: Sequence[str] | None = None, compile_default: str = "off") -> None:
    """What every command that runs a model takes (``ModelConfig``)."""
    add_config_flags(p.add_argument_group("model"), ModelConfig, only=only, defaults={"compile": compile_default})


def _seed_arg(p) -> None:
    """``--seed``, as ``evaluate`` has it (``EvalConfig.seed``)."""
    add_config_flags(p, EvalConfig, only=("seed",))


def _max_cycle_arg(p: argparse.ArgumentParser, where: str) -> None:
    """``--max-cycle`` of ``match`` and ``transfer``: ``where`` says what a failing point becomes."""
    p.add_argument("--max-cycle", type=_number(float, above=0), default=None, metavar="C",
                   help="a point whose forward-backward cycle (its distance back in A over A's longer side) exceeds this, e.g. 0.05, "
                        f"is marked unreliable: \"reliable\": false in {where} (default: no threshold)")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    """What the commands that match users' images take besides the model."""
    g = p.add_argument_group("prompt and matching")
    g.add_argument("--prompt", default="empty", help="'empty', 'text:<words>' (e.g. text:\"a photo of a cat\") or a trained prompt folder")
    g.add_argument("--category", help="category for per-category prompts and text templates with {category}")
    g.add_argument("--dino", help=DINO_HELP)
    add_config_flags(g, MatchConfig)
    g.add_argument("--max-side", type=_number(int, at_least=1), default=2048, help="larger pictures are downscaled to this before the model (points stay in original pixels)")
    g.add_argument("--cache", type=Path, help="keep feature maps (and VAE posteriors) in this folder too, so later runs skip their extraction")
    g.add_argument("--store-gb", type=_number(float, at_least=0), default=1.0, help="memory for stored maps and VAE posteriors, GB")


def load_model(model: ModelConfig):
    """The featurizer ``model`` describes, on its device, in its dtype."""
    from sd4match.checks import check_diffusion_settings
    from sd4match.features import load_featurizer
    from sd4match.runtime import pick_device, pick_dtype

    check_diffusion_settings(model.model, timesteps=[model.timestep], up_blocks=[model.up_block], noise_schedules=[model.noise_schedule],
                             resolution=model.resolution)
    dev = pick_device(model.device)
    compiled, compile_mode = compile_choice(model.compile, dev.type)
    kw = {"timestep": model.timestep, "up_block": model.up_block, "ensemble": model.ensemble, **({"max_batch": model.max_batch} if model.max_batch else {}),
          "compile": compiled, "compile_mode": compile_mode, "dino_input": model.dino_input, "dino_pos": model.dino_pos, "noise_schedule": model.noise_schedule,
          "vae_batch": model.vae_batch, **kernel_choice(model, dev.type)}
    if model.model_config:
        kw["config"] = model.model_config
    if model.resolution:
        kw["resolution"] = model.resolution
    feat = load_featurizer(model.model, **kw).to(dev, pick_dtype(model.dtype, dev))
    _warn_unused_diffusion_settings(model, feat)
    return feat


def _warn_unused_diffusion_settings(model: ModelConfig, feat) -> None:
    """A diffusion setting given another value than its default, for a model without diffusion
    (effnet-lite0, DINOv2): one warning line, as it changes nothing."""
    if feat.has_posterior:
        return
    default = ModelConfig()
    given = [f"--{k.replace('_', '-')} {getattr(model, k)}" for k in ("timestep", "up_block", "ensemble", "noise_schedule")
             if getattr(model, k) != getattr(default, k)]
    _warn_changes_nothing(given, head=f"{feat.model_id} is not a diffusion model: ")


def _warn_changes_nothing(flags: Sequence[str], *, head: str = "", tail: str = "") -> None:
    """One warning line: ``flags`` (as given) change nothing in this run."""
    if flags:
        warnings.warn(f"{head}{', '.join(flags)} {'changes' if len(flags) == 1 else 'change'} nothing{tail}", Sd4MatchWarning, stacklevel=3)


def _dino_for(prompt: str, dino: str, feat, pos: str = "official"):
    """DINOv2 on the featurizer's device when the prompt takes DINOv2 tokens, else None."""
    from sd4match.features import DinoFeaturizer
    from sd4match.prompts import parse_prompt

    if parse_prompt(prompt).needs_dino:
        dtype = next(feat.parameters()).dtype
        return DinoFeaturizer.from_pretrained(dino, pos=pos).to(feat.device, dtype)
    return None


def load_matcher(args):
    """The featurizer, and DINOv2 for a prompt that takes its tokens, wrapped in a ``Matcher``."""
    from sd4match.usermatch import Matcher

    model = config_from_args(ModelConfig, args)
    feat = load_model(model)
    m = config_from_args(MatchConfig, args)
    return Matcher(feat, args.prompt, category=args.category, dino=_dino_for(args.prompt, args.dino, feat, model.dino_pos), rule=m.rule, temperature=m.temperature,
                   sigma=m.sigma, similarity=m.similarity, seed=args.seed, cache_dir=args.cache, cache_bytes=int(args.store_gb * (1 << 30)))


def _check_common(args, *, prompt: bool = True) -> None:
    """The model source, device, prompt and output folder: named before any model loads
    (and ``--dino`` resolved, when the command takes it)."""
    from sd4match.checks import check_device, check_dino, check_model, check_output_folder, check_prompt, check_prompt_categories, check_prompt_fits_model

    check_device(args.device)
    check_model(args.model)
    if prompt and getattr(args, "prompt", None):
        spec = check_prompt(args.prompt)
        check_prompt_fits_model(args.model, spec, f"--prompt {args.prompt}")
        if hasattr(args, "dino"):
            args.dino = check_dino(spec, args.dino)
        if hasattr(args, "category"):  # match, transfer, serve: one category for every picture
            if spec.requires_category and not args.category:
                raise Sd4MatchError(f"--prompt {args.prompt}: this prompt needs --category")
            if args.category and not spec.requires_category:
                _warn_changes_nothing([f"--category {args.category}"], tail=f" with --prompt {args.prompt}")
            elif args.category:
                check_prompt_categories(args.prompt, [args.category])
    if all(hasattr(args, k) for k in ("rule", "temperature", "sigma")):
        _warn_changes_nothing(unused_rule_settings(args.rule, args.temperature, args.sigma), tail=f" with --match {args.rule}")
    if getattr(args, "out", None) is not None:
        check_output_folder(args.out)
    for flag, store in (("--cache-dir", getattr(args, "cache_dir", None)), ("--cache", getattr(args, "cache", None))):
        if store:
            check_output_folder(store, flag)


DINO_HELP = "DINOv2 model for prompts that take its tokens (cpm) (default: the one the prompt folder records, else dinov2-b)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd4match", description="Semantic correspondence with Stable Diffusion features and learned prompts.",
                                     formatter_class=_Help)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    p = command("pairs", "export a split's pair records as JSON Lines")
    _dataset_args(p)
    p.add_argument("--out", type=Path, help="write here instead of stdout")
    p.add_argument("--apply-flip", action="store_true", help="PF-Pascal trn: return pairs with flip=1 mirrored")
    p.set_defaults(func=cmd_pairs)

    p = command("score", "PCK of a predictions file under a named protocol")
    _dataset_args(p)
    p.add_argument("--predictions", required=True, type=Path, help='JSON Lines {"id", "kps"} in original target pixels')
    p.add_argument("--protocol", default="standard", choices=typing.get_args(Protocol), help=PROTOCOL_HELP)
    p.add_argument("--alphas", type=_parser_type(parse_alphas), default=DEFAULT_ALPHAS, help="comma-separated PCK thresholds (default: 0.05,0.1,0.15)")
    p.add_argument("--allow-missing", action="store_true", help="score pairs without a prediction as 0")
    p.add_argument("--limit", type=_number(int, at_least=0), default=0,
                   help="score the N pairs `evaluate --limit N` takes (each category its share), e.g. to rescore such a run under another protocol")
    p.add_argument("--json", action="store_true", help="print the score as JSON")
    p.add_argument("--out", type=Path, help="also write the score JSON here")
    p.add_argument("--plot", type=Path, help="write a per-category bar chart (.png, or .pdf, .svg, ...: the suffix decides)")
    p.add_argument("--seen", help="the categories a prompt was trained on (its folder, or a comma-separated list): also report the mean "
                                  "over seen and over unseen categories")
    p.add_argument("--pck-base", choices=("bbox", "image", "kps"), help="the threshold base b, to compare with a table that uses another "
                                                                        "than the dataset's own: max side of the target box, of the target "
                                                                        "image, or max extent of the target keypoints")
    p.add_argument("--categories", type=_parser_type(parse_names), help="only the pairs of these categories, comma-separated (as evaluate --categories)")
    p.add_argument("--by-keypoint", action="store_true", help="also print PCK per point for each keypoint of each category (SPair-71k, "
                                                             "SPair-U, AP-10K, CUB, MP-100: the datasets that number their keypoints; "
                                                             "score.json holds it as by_keypoint either way)")
    p.add_argument("--per-pair", type=Path, metavar="FILE", help="also write each pair's PCK and each point's error / b (JSON Lines)")
    p.add_argument("--worst", type=Path, metavar="PNG", help="draw the pairs of lowest PCK@0.1 (the middle of --alphas when they lack 0.1): "
                                                             "ground truth, prediction and the error between them, on one sheet; needs the "
                                                             "pictures under --root")
    p.add_argument("--worst-count", type=_number(int, at_least=1, at_most=48), default=12, help="how many pairs --worst draws (at most 48: "
                                                                                                  "one sheet a viewer opens)")
    p.set_defaults(func=cmd_score)

    p = command("datasets", "inspect datasets")
    dsub = p.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="what is present, missing or unreadable; decodes every image", formatter_class=_Help)
    _dataset_args(c, split=False)
    c.add_argument("--quick", action="store_true", help="read image headers only (fast; a truncated image passes)")
    c.add_argument("--no-images", action="store_true", help="do not look at the images at all")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_datasets_check)
    c = dsub.add_parser("prepare", help="build a dataset's correspondence layout from its official download (ap10k: as GeoAware-SC's notebook, "
                                        "deterministically), or your own pairs from a COCO keypoints file (custom)", formatter_class=_Help)
    c.add_argument("name", choices=["ap10k", "custom"], help="the dataset")
    c.add_argument("--from", dest="source", required=True, type=Path,
                   help="ap10k: the official download (annotations/ and data/); custom: a COCO keypoints file (an annotation tool's export)")
    c.add_argument("--root", required=True, type=Path, help="the new dataset root (must not hold a layout yet)")
    c.add_argument("--crowd", type=Path, help="ap10k: GeoAware-SC's ap-10k_is_crowd.txt (default: the one in --from)")
    c.add_argument("--copy", action="store_true", help="ap10k: copy the pictures (default: hard links where the file system allows)")
    c.add_argument("--images", type=Path, help="custom: the folder the COCO file's file_name values are relative to (default: the file's folder)")
    c.add_argument("--val", type=_number(float, at_least=0, at_most=0.9), default=0.1, help="custom: each category's share of pictures for val")
    c.add_argument("--test", type=_number(float, at_least=0, at_most=0.9), default=0.2, help="custom: each category's share of pictures for test")
    c.add_argument("--min-points", type=_number(int, at_least=1), default=1, help="custom: a pair needs this many points labelled in both pictures")
    c.add_argument("--max-pairs", type=_number(int, at_least=0), default=0,
                   help="custom: at most this many pairs of a category in a split, drawn with --seed (0: every pair)")
    c.add_argument("--seed", type=int, default=0, help="custom: the seed of the pictures' split (and of --max-pairs' draw)")
    c.add_argument("--no-boxes", action="store_true", help="custom: PCK base from the target picture's size, not the annotations' boxes "
                                                            "(for files whose boxes are the points' tight box, as a transfer's coco.json)")
    c.set_defaults(func=cmd_datasets_prepare, flag_defaults={d: c.get_default(d) for ds in PREPARE_FLAGS.values() for d in ds})

    p = command("features", "extract and keep the feature maps of a folder of images")
    p.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="store folder (features/<key>.safetensors + index.json)")
    p.add_argument("--prompt", help="'empty' (the default), 'text:<words>', or a trained prompt folder whose maps need no partner picture "
                                    "(single, category, hidden, cpm-image; not cpm)")
    p.add_argument("--text", help="a text prompt: the same as --prompt text:<words>")
    p.add_argument("--category", help="category of every picture, for per-category prompts and text templates with {category}")
    p.add_argument("--dino", help=DINO_HELP)
    p.add_argument("--batch-size", type=_number(int, at_least=1), default=8, help="pictures handed to the featurizer at once: their VAE posteriors in calls of up to "
                                                               "--vae-batch, the UNet in calls of up to --max-batch samples")
    p.add_argument("--store-gb", type=_number(float, at_least=0), default=0.5, help="memory for maps and VAE posteriors while extracting, GB (the folder keeps them all)")
    p.add_argument("--workers", type=_number(int, at_least=0), default=4, help="loader threads decoding ahead (0: decode in the main thread)")
    p.add_argument("--pca", type=_number(int, at_least=0, at_most=64), default=0, metavar="N",
                   help="also write pca.png: the first N pictures beside the joint PCA of their maps (0: none; at most 64: "
                        "their maps are held in memory, 1.3 GB for 50 SD maps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _seed_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_features)

    p = command("train", "learn a prompt (presets: {single,category,cpm}-{spair,pfpascal})")
    p.add_argument("--preset", choices=list(TRAIN_PRESETS), help="the paper's settings for a prompt kind and training set")
    p.add_argument("--config", type=Path, help="YAML file of settings (applied after the preset)")
    p.add_argument("--out", type=Path, required=True, help="run folder: config.json, scalars.jsonl, checkpoints/, best/, last/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint (error if it has none)")
    g.add_argument("--resume-or-start", action="store_true", help="continue the run in --out if it has a checkpoint, else start it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p.add_argument_group("settings (a flag given overrides the preset and the YAML file)"), TrainConfig, unset=True)
    p.set_defaults(func=cmd_train)

    p = command("evaluate", "predict a split with a prompt; write predictions.jsonl and score.json")
    p.add_argument("--out", required=True, type=Path, help="folder for predictions.jsonl and score.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out at its first missing pair")
    g.add_argument("--overwrite", action="store_true", help="replace a finished evaluation in --out made with other settings (without it, such a folder is refused)")
    p.add_argument("--dino", help=DINO_HELP)
    p.add_argument("--cache-dir", type=Path, help="keep feature maps, VAE posteriors and DINOv2 tokens here too, for later runs")
    p.add_argument("--store-gb", type=_number(float, at_least=0), default=2.0, help="memory for stored maps, VAE posteriors and DINOv2 tokens, GB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p.add_argument_group("evaluation"), EvalConfig)
    _model_args(p, compile_default="auto")
    p.set_defaults(func=cmd_evaluate, command_parser=p)

    p = command("match", "match points of image A in image B; write matches.json and matches.png")
    p.add_argument("source", type=Path, help="image A")
    p.add_argument("target", type=Path, help="image B")
    p.add_argument("--points", help="\"x,y;x,y\" in A's pixels, or JSON of named points (a file, or the text itself: '{\"eye\": [x, y]}'); "
                                    "default: automatic points on the salient object")
    p.add_argument("--min-score", type=_number(float), default=0.0, help="without --points: keep mutual matches with cosine >= this")
    p.add_argument("--max-points", type=_number(int, at_least=1), default=20, help="without --points: at most this many, spread over the object")
    p.add_argument("--dense", action="store_true", help="also write A warped onto B (warped.png), confidence.png and dense.npz")
    _max_cycle_arg(p, "matches.json, hollow ends in matches.png")
    _prompt_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _seed_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_match)

    p = command("transfer", "place A's named points on every image of a folder; a JSON per image, coco.json and sheet.png")
    p.add_argument("--source", type=Path, action="append",
                   help="image A; give --source and --points again for more annotated images: each target's point of a name then "
                        "comes from the source whose match of it comes back closest (smallest cycle)")
    p.add_argument("--points", action="append",
                   help="JSON of named points in A's pixels, a file or the text itself (or \"x,y;x,y\"); one --points per --source, in order")
    p.add_argument("--from-coco", type=Path, default=None, metavar="FILE",
                   help="COCO keypoints file (an annotation tool's export, or a corrected coco.json): every annotated picture is a source")
    p.add_argument("--coco-images", type=Path, default=None, metavar="DIR", help="folder the --from-coco file's file_name values are relative to (default: --targets)")
    p.add_argument("--targets", required=True, type=Path, help="folder of images (searched recursively)")
    _max_cycle_arg(p, "its JSON, unlabelled in coco.json, hollow on the sheet")
    _prompt_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (files of an earlier run are replaced only when this run succeeds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-bad", action="store_true", help="go past targets that cannot be read: listed with their problems in skipped.json")
    p.add_argument("--check", action="store_true", help="several sources: also predict each source's points from the others and score them "
                                                         "(check.json and a table: how well this transfer is likely to do)")
    _seed_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_transfer)

    p = command("serve", "a local web page: click a point in one image, see its match in the other")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback: only this machine)")
    p.add_argument("--port", type=_number(int, at_least=0, at_most=65535), default=7860, help="port")
    p.add_argument("--images", type=Path, help="a folder of images to pick from on the page (the first two are shown)")
    p.add_argument("--max-upload-mb", type=_number(float, above=0), default=20.0, help="largest upload accepted")
    p.add_argument("--max-pixels", type=_number(float, above=0), default=50e6, help="largest image (width x height) accepted")
    _prompt_args(p)
    _seed_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_serve)

    p = command("sweep", "evaluate a grid of timestep x layer (x ensemble x noise schedule); write sweep.json, table.md/csv and plots")
    p.add_argument("--out", required=True, type=Path, help="folder for sweep/<cell>/, sweep.json, table.md, table.csv, pck_vs_t.png, heatmap.png")
    p.add_argument("--timesteps", required=True, type=_parser_type(_grid), help="a list (50,100,261) or start:stop:step (stop excluded)")
    p.add_argument("--up-blocks", required=True, type=_parser_type(_grid), help="layers read, e.g. 0,1,2 (from one UNet pass per timestep)")
    p.add_argument("--ensembles", type=_parser_type(_grid), default=(8,), help="noisy copies per picture (default: 8)")
    p.add_argument("--noise-schedules", type=_parser_type(_schedules), default=("model",), help="comma-separated --noise-schedule values "
                                                                                              "(default: model)")
    p.add_argument("--dino", help=DINO_HELP)
    p.add_argument("--cache-dir", type=Path, help="keep VAE posteriors and DINOv2 tokens (and maps) here too, for later runs")
    p.add_argument("--store-gb", type=_number(float, at_least=0), default=4.0, help="memory for VAE posteriors and DINOv2 tokens, kept for the whole grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p.add_argument_group("evaluation (every cell)"), EvalConfig)
    _model_args(p, only=("model", "model_config", "device", "dtype", "resolution", "max_batch", "vae_batch", "compile", "dino_input", "dino_pos",
                         "channels_last", "attention", "cudnn_benchmark"), compile_default="auto")
    p.set_defaults(func=cmd_sweep, command_parser=p)

    p = command("compare", "accuracy beside training cost for several evaluations: compare.md, compare.csv, compare.tex, compare.png")
    p.add_argument("runs", nargs="+", type=Path, help="evaluate output folders (each with its score.json)")
    p.add_argument("--out", type=Path, help="also write compare.md, compare.csv, compare.tex (the per-category table as LaTeX) and compare.png here")
    p.add_argument("--root", type=Path, help="the dataset's root: each run's pairs scored again one by one for 95%% confidence intervals "
                                             "and paired differences from the first run")
    p.add_argument("--images", type=Path, help=IMAGES_HELP)
    p.set_defaults(func=cmd_compare)

    p = command("reproduce", "the paper's Table 1 from the authors' released prompts: import, evaluate every row, write table.md/csv/png")
    p.add_argument("--prompts", required=True, type=Path, help="the authors' pretrained_prompts.zip, or the folder it was unzipped into")
    for ds, label in (("spair", "SPair-71k (the folder holding JPEGImages/)"), ("pfpascal", "PF-Pascal (the folder holding PF-dataset-PASCAL/)"),
                      ("pfwillow", "PF-Willow (the folder holding PF-dataset/)")):
        p.add_argument(f"--{ds}", type=Path, help=f"root of {label}; a dataset not given is listed as missing")
    p.add_argument("--out", required=True, type=Path, help="folder for prompts/, runs/, table.md, table.csv, table.png (a rerun skips what is done)")
    p.add_argument("--timesteps", type=_parser_type(_grid), default=(50, 261), help="timesteps of each row, a list or start:stop:step (default: "
                                                                                   "50,261: the official test script's and the training one)")
    p.add_argument("--ensemble", type=_number(int, at_least=1), default=8, help="noisy copies averaged per picture")
    p.add_argument("--limit", type=_number(int, at_least=0), default=0, help="only N pairs of each test split, each category its share (a quick look; 0: every pair)")
    p.add_argument("--dino", default="dinov2-b", help="DINOv2 model of the CPM prompts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_args(p, only=("model", "model_config", "device", "dtype", "resolution", "max_batch", "vae_batch", "compile", "dino_pos", "channels_last",
                         "attention", "cudnn_benchmark"), compile_default="auto")
    p.set_defaults(func=cmd_reproduce)

    p = command("prompts", "import the authors' released prompts; show what a prompt folder holds")
    psub = p.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    c = psub.add_parser("import", help="turn an official caption.pt (single, category) or ckpt.pt (cpm) into a prompt folder", formatter_class=_Help)
    c.add_argument("file", type=Path, help="the released file (from the authors' pretrained_prompts.zip)")
    c.add_argument("--kind", required=True, choices=typing.get_args(ImportKind), help="what the file holds")
    c.add_argument("--out", required=True, type=Path, help="prompt folder to write (must not exist yet)")
    c.add_argument("--dino", default="dinov2-b", help="cpm: the DINOv2 whose width the file must fit")
    c.add_argument("--cpm-config", help="cpm: the official captioner config, <Pair|Img>-DINO-<Feat|Head>-G<n>-C<n> (default: from the file's "
                                        "folder name, e.g. CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50, or its keys)")
    _model_args(c, only=("model", "model_config", "device"))
    c.set_defaults(func=cmd_prompts_import)
    c = psub.add_parser("push", help="upload a prompt folder to the Hugging Face hub with a model card", formatter_class=_Help)
    c.add_argument("folder", type=Path, help="the prompt folder (prompt.safetensors + config.json)")
    c.add_argument("repo", help="hub repository id, owner/name (created when missing)")
    c.add_argument("--score", type=Path, help="a score.json of sd4match evaluate (or its folder): its numbers go into the model card")
    c.add_argument("--private", action="store_true", help="create the repository private")
    c.add_argument("--revision", help="branch to push to (default: main)")
    c.add_argument("--token", help="hub token (default: the one `hf auth login` stored, or HF_TOKEN)")
    c.set_defaults(func=cmd_prompts_push)
    c = psub.add_parser("show", help="print what a prompt folder holds", formatter_class=_Help)
    c.add_argument("folder", help="a prompt folder, or hf://owner/name[@revision][/subfolder]")
    c.set_defaults(func=cmd_prompts_show)

    p = command("env", "what a bug report needs: versions, devices, the hub cache and which weights are on this machine")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_env)

    p = command("download", "fetch a benchmark from its published address")
    p.add_argument("dataset", choices=("spair", "pfpascal", "pfwillow", "spair-u", "cub"), type=dataset_name,
                   help="benchmark name (ap10k and mp100 have no plain public address: the README says where to get them)")
    p.add_argument("--root", required=True, type=Path, help="the dataset root to create or complete")
    p.add_argument("--mirror", help="fetch each file as MIRROR/<file name> instead of its published address")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)
    return parser


def _open(args):
    from sd4match.data import dataset_options, open_dataset

    return open_dataset(args.dataset, args.root, **dataset_options(args))


def _pair_lists(ds) -> list[tuple[str, Path]]:
    """The files that list a dataset's pairs (``--root``'s own), as ``check_distinct_files`` inputs."""
    return [(f"--root ({split})", path) for split in ds.splits if (path := ds.split_file(split)) is not None and path.is_file()]


def cmd_pairs(args) -> int:
    from sd4match.checks import check_distinct_files, check_output_file
    from sd4match.data import write_jsonl

    if args.out is not None:
        check_output_file(args.out, "--out", "pairs.jsonl")
    ds = _open(args)
    check_distinct_files([("--out", args.out)], _pair_lists(ds))
    recs = ds.pairs(args.split, apply_flip=args.apply_flip)
    if args.apply_flip and not any(r.meta.get("flip") for r in recs):
        warnings.warn(f"--apply-flip changes nothing: no pair of {args.dataset}/{args.split} is marked to be mirrored "
                      "(only PF-Pascal's trn list marks pairs)", Sd4MatchWarning, stacklevel=2)
    if args.out is None:
        write_jsonl(recs, sys.stdout)
    else:
        _write_atomic(args.out, lambda fh: write_jsonl(recs, fh))
        print(f"wrote {len(recs)} pairs to {args.out}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from sd4match.checks import check_distinct_files, check_output_file, check_picture_name
    from sd4match.data.records import limit_pairs, rebased, select_pairs
    from sd4match.metrics import (draw_worst, format_table, frame_hint, keypoint_table, label_score, load_predictions, pair_details,
                                  plot_categories, score, seen_unseen)

    outputs = (("--out", args.out, "score.json"), ("--plot", args.plot, "bars.png"), ("--per-pair", args.per_pair, "pairs.jsonl"),
               ("--worst", args.worst, "worst.png"))
    for flag, path, example in outputs:
        if path is not None:
            check_output_file(path, flag, example)
    for flag, path, kind in (("--plot", args.plot, "plot"), ("--worst", args.worst, "pillow")):
        if path is not None:
            check_picture_name(path, flag, kind)
    ds = _open(args)
    check_distinct_files([(flag, path) for flag, path, _ in outputs], [("--predictions", args.predictions), *_pair_lists(ds)])
    recs = select_pairs(ds.pairs(args.split), limit=args.limit, categories=args.categories or ())
    if args.pck_base:
        recs = rebased(recs, args.pck_base, args.dataset)
    preds = load_predictions(args.predictions)
    if not args.limit and not args.categories and not args.allow_missing and 0 < len(preds) < len(recs):
        n = len(preds)
        if set(preds) == {r.id for r in limit_pairs(recs, n)}:  # an `evaluate --limit n` run's predictions: say how to score them
            raise Sd4MatchError(f"{args.predictions}: holds {n} of the split's {len(recs)} pairs, those `evaluate --limit {n}` takes: "
                                f"pass --limit {n} to score them (--allow-missing would score the others as 0)")
        cats = sorted({r.category for r in recs if r.id in preds})
        if set(preds) == {r.id for r in recs if r.category in cats}:  # an `evaluate --categories` run's: the same
            raise Sd4MatchError(f"{args.predictions}: holds the pairs of {len(cats)} of the split's categories, those `evaluate --categories "
                                f"{','.join(cats)}` takes: pass --categories {','.join(cats)} to score them")
    result = score(recs, preds, protocol=args.protocol, alphas=args.alphas, allow_missing=args.allow_missing, where=str(args.predictions))
    hint = frame_hint(recs, preds)  # predictions in the 768 frame scored 0 without a word
    if hint:
        warnings.warn(f"{args.predictions}: {hint}", Sd4MatchWarning, stacklevel=2)
    if args.by_keypoint and "by_keypoint" not in result:
        raise Sd4MatchError(f"--by-keypoint: {args.dataset}'s pairs do not number their keypoints (only their order in each pair is known; "
                            "your own pairs can name them in meta.kps_ids)")
    if args.seen:
        result["seen_unseen"] = seen_unseen(result, _seen_categories(args.seen))
    label_score(result, args.dataset, args.split, args.categories or ())
    if args.pck_base:
        result["pck_base"] = args.pck_base
    text = json.dumps(result, indent=2)
    if args.out:
        _write_atomic(args.out, lambda fh: fh.write(text + "\n"))
    if args.plot:
        plot_categories(result, args.plot, title=f"{args.dataset}/{args.split}")
    if args.per_pair:
        rows = pair_details(recs, preds, protocol=args.protocol, alphas=args.alphas)
        _write_atomic(args.per_pair, lambda fh: fh.writelines(json.dumps(row) + "\n" for row in rows))
    print(text if args.json else format_table(result, f"{args.dataset}/{args.split}"))
    if args.by_keypoint and not args.json:
        print("\n" + keypoint_table(result, f"{args.dataset}/{args.split}"))
    if args.worst:
        alpha = 0.1 if 0.1 in args.alphas else args.alphas[len(args.alphas) // 2]
        ids = draw_worst(recs, preds, ds.root, args.worst, protocol=args.protocol, alpha=alpha, count=args.worst_count)
        print(f"the {len(ids)} pairs of lowest PCK@{alpha:g} drawn in {args.worst}", file=sys.stderr)
    return 0


def _seen_categories(text: str) -> list[str]:
    """``--seen``: a prompt folder (the categories it was trained on) or a comma-separated list."""
    if Path(text).is_dir():
        from sd4match.prompts import read_prompt_config

        cfg = read_prompt_config(text)
        cats = cfg.training.get("categories") or cfg.categories
        if not cats:
            raise Sd4MatchError(f"--seen {text}: the prompt folder does not record the categories it was trained on")
        return list(cats)
    return list(parse_names(text))


def cmd_datasets_check(args) -> int:
    from sd4match.data import dataset_options
    from sd4match.data.check import check_dataset

    images = "none" if args.no_images else "headers" if args.quick else "decode"
    rep = check_dataset(args.dataset, args.root, images=images, progress=not args.no_progress, options=dataset_options(args))
    print(rep.format())
    if not rep.ok:
        raise Sd4MatchError(rep.problems[0] + (f" (and {len(rep.problems) - 1} more problem(s), listed above)" if len(rep.problems) > 1 else ""))
    return 0


#: the flags of ``datasets prepare`` that one dataset reads (another's, given, change nothing)
PREPARE_FLAGS = {"ap10k": ("crowd", "copy"), "custom": ("images", "val", "test", "min_points", "max_pairs", "seed", "no_boxes")}


def cmd_datasets_prepare(args) -> int:
    from sd4match.checks import check_output_folder
    from sd4match.data import prepare_ap10k
    from sd4match.data.coco import prepare_custom

    check_output_folder(args.root, "--root")
    others = [d for name, ds in PREPARE_FLAGS.items() if name != args.name for d in ds]
    _warn_changes_nothing([f"--{d.replace('_', '-')}" for d in others if getattr(args, d) != args.flag_defaults[d]], tail=f" for {args.name}")
    if args.name == "custom":
        if not args.source.is_file():
            raise Sd4MatchError(f"--from {args.source}: no such file (custom: a COCO keypoints file)")
        made = prepare_custom(args.source, args.images or args.source.parent, args.root, val=args.val, test=args.test, seed=args.seed,
                              min_points=args.min_points, boxes=not args.no_boxes, max_pairs=args.max_pairs)
        counts = {split: f"{n['pairs']} pairs of {n['pictures']} pictures" for split, n in made.items()}
    else:
        counts = {split: f"{n} pairs" for split, n in prepare_ap10k(args.source, args.root, crowd=args.crowd, link=not args.copy).items()}
    print(f"{args.name} at {args.root}: " + ", ".join(f"{split} {n}" for split, n in counts.items()), file=sys.stderr)
    print(f"read it with --dataset {args.name} --root {args.root}", file=sys.stderr)
    return 0


def cmd_features(args) -> int:
    from sd4match.checks import check_image_folder, check_picture_headers, check_prompt_fits_model
    from sd4match.extract import check_picture_prompt, extract_folder, pca_sheet, picture_prompt_name
    from sd4match.runtime import run_lock

    name = picture_prompt_name(args.prompt, args.text)
    _check_common(args)
    if name:
        spec = check_picture_prompt(name, args.category)
        if args.text is not None:  # (a --prompt was checked with the others)
            check_prompt_fits_model(args.model, spec, "--text")
    check_picture_headers(check_image_folder(args.images, exclude=args.out))  # a bad file is named before the model loads, not after hours of extraction
    model = config_from_args(ModelConfig, args)
    with run_lock(args.out, "feature extraction"):  # from before the model loads: a second extraction into this store is refused at once
        feat = load_model(model)
        dino = _dino_for(name, args.dino, feat, model.dino_pos) if name else None
        path = extract_folder(feat, args.images, args.out, text=args.text, prompt=args.prompt, category=args.category, dino=dino, seed=args.seed,
                              batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress, store_gb=args.store_gb)
        sheet = pca_sheet(path, args.images, path.parent / "pca.png", count=args.pca, seed=args.seed) if args.pca else None
    print(f"features of {args.images} under {args.model} are in {path.parent} (index: {path})", file=sys.stderr)
    if sheet is not None:
        n = min(args.pca, len(json.loads(path.read_text())["images"]))
        print(f"joint PCA of the maps of {n} picture{'s' if n != 1 else ''}: {sheet}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from sd4match.checks import check_device, check_diffusion_settings, check_model, check_output_folder, check_splits
    from sd4match.config import load_train_config
    from sd4match.data import dataset_options, open_dataset
    from sd4match.runtime import distributed_rank_world, finish_distributed, run_lock
    from sd4match.train import Trainer, check_run_folder, unused_settings

    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    over["root"] = str(args.root)
    cfg = load_train_config(args.preset, args.config, **over)
    # inputs first, in seconds: device, model source, data, run folder
    check_device(cfg.device)
    check_model(cfg.model)
    check_diffusion_settings(cfg.model, timesteps=[cfg.timestep], up_blocks=[cfg.up_block], noise_schedules=[cfg.noise_schedule], resolution=cfg.resolution)
    _warn_changes_nothing(unused_settings(cfg), tail=f" in a --adapt {cfg.adapt}" + (f" --prompt {cfg.prompt}" if cfg.adapt.startswith("prompt") else "") + " run")
    if cfg.val_every:  # a root without a validation list (PF-Willow, your own pairs): the two ways on, named
        ds = open_dataset(cfg.dataset, cfg.root, **dataset_options(cfg))
        if cfg.val_split in ds.splits and ds.split_file(cfg.val_split) is None:
            raise Sd4MatchError(f"{cfg.root}: no pair list for the validation split {cfg.val_split!r} ({ds.expected_split_file(cfg.val_split)} is missing): "
                                "validate on another split with --val-split, or not at all with --val-every 0")
    check_splits(cfg.dataset, cfg.root, [cfg.train_split] + ([cfg.val_split] if cfg.val_every else []), pictures=True, options=dataset_options(cfg))
    if cfg.train_split == "test" and cfg.dataset != "synthetic":  # synthetic pairs are warps of your own pictures: no benchmark to spoil
        warnings.warn(f"training on {cfg.dataset}'s test split: its scores on that split are no longer held out, "
                      "and not comparable with published numbers", Sd4MatchWarning, stacklevel=2)
    elif cfg.val_every and cfg.val_split == cfg.train_split:
        warnings.warn(f"validating on the training split ({cfg.train_split}): best/ is chosen on pairs it learned from", Sd4MatchWarning, stacklevel=2)
    check_output_folder(args.out)
    if cfg.cache_dir:
        check_output_folder(cfg.cache_dir, "--cache-dir")
    try:
        # held from before the run folder is read to the end: a second run into it (a job
        # submitted twice, a requeued one beside the first) is refused before it deletes or writes anything
        with run_lock(args.out, "training run"):
            resume = check_run_folder(args.out, resume=args.resume, resume_or_start=args.resume_or_start)
            out = Trainer(cfg, args.out, progress=not args.no_progress).run(resume=resume)
    except RunStopped:
        finish_distributed()  # every process stopped at the same step
        raise
    rank = distributed_rank_world()[0]
    finish_distributed()
    if rank == 0:
        print(f"trained prompt: {out / 'best'} (last: {out / 'last'})", file=sys.stderr)
    return 0


def _apply_preset(args) -> None:
    """Set the preset's values on every setting still at its default. A Stable Diffusion
    recipe (its text prompt, timestep and layer) given a ``--model`` that is not SD is named
    here: its prompt was refused as if given ("effnet-lite0 takes no prompt")."""
    from sd4match.features import sd_source

    preset = EVAL_PRESETS[args.preset]
    given = args.model if args.model != args.command_parser.get_default("model") else None
    if given is not None and sd_source(preset["model"]) is not None and sd_source(given) is None:
        raise Sd4MatchError(f"--preset {args.preset} is a Stable Diffusion recipe (model {preset['model']}, prompt {preset['prompt']}, timestep "
                            f"{preset['timestep']}, up block {preset['up_block']}); --model {given} is not Stable Diffusion: leave out the preset, "
                            "or give an SD model")
    for k, v in preset.items():
        if getattr(args, k) == args.command_parser.get_default(k):
            setattr(args, k, v)


def _eval_records(cfg: EvalConfig) -> list:
    """The pairs an evaluation reads (``--categories`` and ``--limit`` applied: ``select_pairs``), and every picture they read there
    (unless ``--skip-bad`` goes past missing ones): checked before any model loads."""
    from sd4match.checks import check_pictures, check_prompt_categories, check_splits
    from sd4match.data import dataset_options
    from sd4match.data.records import select_pairs

    recs = select_pairs(check_splits(cfg.dataset, cfg.root, [cfg.split], options=dataset_options(cfg))[cfg.split], limit=cfg.limit,
                        categories=cfg.categories)
    check_prompt_categories(cfg.prompt, {r.category for r in recs})
    if not cfg.skip_bad:
        check_pictures(cfg.root, recs)
    return recs


def cmd_evaluate(args) -> int:
    from sd4match.runtime import run_lock

    if args.preset:
        _apply_preset(args)
    model = config_from_args(ModelConfig, args)
    cfg = config_from_args(EvalConfig, args)
    _check_common(args)
    recs = _eval_records(cfg)
    request = {**{k: getattr(model, k) for k in ("model", "model_config", "dtype", "timestep", "up_block", "ensemble", "resolution", "noise_schedule")},
               "dino": args.dino, "dino_input": model.dino_input, "dino_pos": model.dino_pos,
               **({"vae_batch": model.vae_batch} if model.vae_batch != 1 else {})}  # one a call: the runs of earlier versions
    with run_lock(args.out, "evaluation"):  # held from before the model loads to the end: a second run into this folder is refused at once
        return _run_evaluation(args, model, cfg, recs, request)


def _run_evaluation(args, model, cfg, recs, request) -> int:
    from sd4match.evaluate import check_evaluation_folder, evaluate, print_score
    from sd4match.runtime import distributed_rank_world, finish_distributed
    from sd4match.store import Store

    check_evaluation_folder(args.out, resume=args.resume, cfg=cfg, request=request, overwrite=args.overwrite)
    feat = load_model(model)
    dino = _dino_for(cfg.prompt, args.dino, feat, model.dino_pos)
    store = Store(int(args.store_gb * (1 << 30)), folder=args.cache_dir)
    out = evaluate(feat, cfg, args.out, dino=dino, progress=not args.no_progress, records=recs, store=store, resume=args.resume, request=request,
                   overwrite=args.overwrite)
    rank = distributed_rank_world()[0]
    finish_distributed()
    if rank != 0:
        return 0
    print(print_score(out))
    print(f"predictions and score in {out.out}", file=sys.stderr)
    return 0


def _check_points(spec: str | None, source: Path) -> list | None:
    """The points of ``--points`` (parsed) lie inside the source picture: checked from its header."""
    from sd4match.data.images import oriented_size
    from sd4match.usermatch import check_points_within, parse_points

    points = parse_points(spec) if spec is not None else None  # an empty --points is an error, not "automatic points"
    if points is not None:
        check_points_within(points, str(source), oriented_size(source))
    return points


def cmd_match(args) -> int:
    from sd4match.checks import check_picture
    from sd4match.usermatch import run_match

    check_picture(args.source)
    check_picture(args.target)
    points = _check_points(args.points, args.source)
    _check_common(args)
    res = run_match(load_matcher(args), args.source, args.target, args.out, points=points, dense=args.dense,
                    min_score=args.min_score, max_points=args.max_points, max_side=args.max_side, max_cycle=args.max_cycle)
    for m in res["matches"]:
        print(f"{m['name']}\t{m['source'][0]:.2f},{m['source'][1]:.2f}\t->\t{m['target'][0]:.2f},{m['target'][1]:.2f}\tscore {m['score']:.4f}"
              f"\tcycle {m['cycle']:.3f}" + ("\tunreliable" if m.get("reliable", True) is False else ""))
    n = len(res["matches"])
    print(f"{n} match{'es' if n != 1 else ''} in {args.out / 'matches.json'} and {args.out / 'matches.png'}", file=sys.stderr)
    return 0


def cmd_transfer(args) -> int:
    from sd4match.checks import check_picture, check_picture_headers
    from sd4match.data.images import oriented_size
    from sd4match.usermatch import SHEET_TARGETS, check_points_within, coco_sources, run_transfer, sheet_names, transfer_targets

    sources, specs = args.source or [], args.points or []
    if len(sources) != len(specs):
        raise Sd4MatchError(f"{len(sources)} --source and {len(specs)} --points: give each source its --points, in the same order")
    if not sources and args.from_coco is None:
        raise Sd4MatchError("no source: give --source and --points, or --from-coco")
    _warn_changes_nothing([f"--coco-images {args.coco_images}"] if args.coco_images is not None and args.from_coco is None else [],
                          tail=" without --from-coco")
    if not args.targets.is_dir():
        raise Sd4MatchError(f"--targets {args.targets}: no such folder")
    points = [_check_points(spec, src) for src, spec in zip(sources, specs)]
    if args.from_coco is not None:
        for src, ps in coco_sources(args.from_coco, args.coco_images or args.targets):
            check_points_within(ps, str(src), oriented_size(src))
            sources, points = [*sources, src], [*points, ps]
    if args.check and len(sources) < 2:
        raise Sd4MatchError("--check predicts each source's points from the other sources: give two or more (--source/--points, --from-coco)")
    for src in dict.fromkeys(sources):
        check_picture(src)
    files = transfer_targets(args.targets, sources, args.out)
    if not args.skip_bad:
        try:
            check_picture_headers(files)  # a target that fails later leaves --out as it was
        except Sd4MatchError as e:
            raise Sd4MatchError(f"{e}; --skip-bad goes past targets that cannot be read") from None
    _check_common(args)
    one = len(sources) == 1
    written = run_transfer(load_matcher(args), sources[0] if one else sources, points[0] if one else points, args.targets, args.out,
                           max_side=args.max_side, progress=not args.no_progress, max_cycle=args.max_cycle, skip_bad=args.skip_bad,
                           check=args.check)
    pages = sheet_names(len(written))
    sheets = pages[0] if len(pages) == 1 else f"{pages[0]} to {pages[-1]} ({SHEET_TARGETS} images a page)"
    n = len(written)
    origin = f" from {len(sources)} sources" if not one else ""
    print(f"{n} image{'s' if n != 1 else ''}{origin}: {'one JSON each' if n != 1 else 'its JSON'}, {'all of them' if n != 1 else 'it'} in coco.json "
          f"(COCO keypoints), and {sheets} in {args.out}", file=sys.stderr)
    if args.check:
        print(_check_table(json.loads((args.out / "check.json").read_text(encoding="utf-8"))))
    if args.skip_bad and (args.out / "skipped.json").is_file():
        bad = json.loads((args.out / "skipped.json").read_text(encoding="utf-8"))
        print(f"{len(bad)} target{'s' if len(bad) != 1 else ''} could not be read and {'were' if len(bad) != 1 else 'was'} skipped "
              f"(listed in {args.out / 'skipped.json'}), the first: {bad[0]['path']}: {bad[0]['problem']}", file=sys.stderr)
    if args.max_cycle is not None:
        kept = [p["reliable"] for f in written for p in json.loads(f.read_text(encoding="utf-8"))["points"]]
        print(f"{kept.count(False)} of {len(kept)} points failed the forward-backward check (cycle above {args.max_cycle:g}): "
              "\"reliable\": false in their JSONs, unlabelled in coco.json, hollow on the sheet", file=sys.stderr)
    return 0


def _check_table(doc: dict) -> str:
    """A transfer's ``check.json`` as a table: PCK per point name and over all points."""
    from sd4match.metrics import alpha_key, pck_rows

    scored = [*doc["by_point"].items(), ("all", doc["all"])]
    if "reliable" in doc and doc["reliable"]["n_points"]:  # what --max-cycle keeps
        scored.append((f"cycle <= {doc['reliable']['max_cycle']:g}", doc["reliable"]))
    return "\n".join([f"check: {doc['protocol']}", *pck_rows("point", scored, [alpha_key(a) for a in doc["alphas"]]), "values in %"])


def cmd_serve(args) -> int:
    from sd4match.checks import check_image_folder
    from sd4match.serve import check_serve, serve

    if args.images is not None:
        check_image_folder(args.images)  # a page that would open with nothing to show is refused
    check_serve(args.host, args.port)
    _check_common(args)
    serve(load_matcher(args), host=args.host, port=args.port, images=args.images, max_upload_bytes=int(args.max_upload_mb * 1e6),
          max_pixels=int(args.max_pixels), max_side=args.max_side)
    return 0


def cmd_env(args) -> int:
    from sd4match.env import environment, format_environment

    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))
    return 0


def cmd_compare(args) -> int:
    from sd4match.checks import check_output_folder
    from sd4match.compare import compare

    if args.out is not None:
        check_output_folder(args.out)
    res = compare(args.runs, args.out, root=args.root, images=args.images)
    print(res["markdown"], end="")
    return 0


def _grid(text: str) -> tuple[int, ...]:
    from sd4match.sweep import parse_grid

    return parse_grid(text)


def _schedules(text: str) -> tuple[str, ...]:
    from sd4match.sweep import parse_schedules

    return parse_schedules(text)


def cmd_sweep(args) -> int:
    from sd4match.checks import check_diffusion_settings
    from sd4match.runtime import run_lock
    from sd4match.sweep import sweep

    if args.preset:
        _apply_preset(args)
    model = config_from_args(ModelConfig, args, timestep=args.timesteps[0], up_block=args.up_blocks[0], ensemble=args.ensembles[0],
                             noise_schedule=args.noise_schedules[0])
    cfg = config_from_args(EvalConfig, args)
    _check_common(args)
    recs = _eval_records(cfg)
    check_diffusion_settings(model.model, timesteps=args.timesteps, up_blocks=args.up_blocks, noise_schedules=args.noise_schedules, resolution=model.resolution)
    with run_lock(args.out, "sweep"):  # from before the model loads: a second sweep into this folder is refused at once
        feat = load_model(model)
        dino = _dino_for(cfg.prompt, args.dino, feat, model.dino_pos)
        res = sweep(feat, cfg, args.out, timesteps=args.timesteps, up_blocks=args.up_blocks, ensembles=args.ensembles, noise_schedules=args.noise_schedules,
                    dino=dino, records=recs, progress=not args.no_progress, store_gb=args.store_gb, cache_dir=args.cache_dir)
    if res.get("best"):
        print((args.out / "table.md").read_text(), end="")
        b = res["best"]
        print(f"\n{res['ran']} cells evaluated now, {len(res['cells']) - res['ran']} read from earlier runs; best: t = {b['timestep']}, "
              f"up_blocks[{b['up_block']}], ensemble {b['ensemble']}, {b['noise_schedule']}: PCK@{res['alpha']} {100 * b['per_image'][res['alpha']]:.2f} "
              f"per image; plots: {args.out / 'pck_vs_t.png'}, {args.out / 'heatmap.png'}")
    return 0


def cmd_reproduce(args) -> int:
    from sd4match.checks import check_diffusion_settings
    from sd4match.features.registry import feature_width
    from sd4match.reproduce import reproduce
    from sd4match.runtime import distributed_rank_world, finish_distributed

    _check_common(args, prompt=False)
    if not args.prompts.exists():
        raise Sd4MatchError(f"--prompts {args.prompts}: no such zip or folder (download pretrained_prompts.zip; see the README)")
    model = config_from_args(ModelConfig, args, ensemble=args.ensemble)
    check_diffusion_settings(model.model, timesteps=args.timesteps, noise_schedules=[model.noise_schedule], resolution=model.resolution)

    made: dict = {}

    def load():
        made["model"] = load_model(model)
        return made["model"]

    def load_dino():  # on the featurizer's device, in its dtype
        from sd4match.features import DinoFeaturizer

        feat = made["model"] if "model" in made else load()
        return DinoFeaturizer.from_pretrained(args.dino, pos=model.dino_pos).to(feat.device, next(feat.parameters()).dtype)

    roots = {"spair": args.spair, "pfpascal": args.pfpascal, "pfwillow": args.pfwillow}
    settings = {k: getattr(model, k) for k in ("model", "model_config", "dtype", "resolution", "dino_pos")}
    res = reproduce(args.prompts, roots, args.out, load_model=load, load_dino=load_dino, model_settings=settings, timesteps=args.timesteps,
                    ensemble=args.ensemble, limit=args.limit, dino_name=args.dino, dino_dim=feature_width(args.dino), progress=not args.no_progress)
    finish_distributed()
    if distributed_rank_world()[0] == 0:
        print((args.out / "table.md").read_text(), end="")
        print(f"\n{res['ran']} evaluations run now, {res['reused']} read from earlier runs; table: {args.out / 'table.md'}")
    return 0


def cmd_prompts_import(args) -> int:
    from sd4match.features.registry import feature_width
    from sd4match.prompts.official import describe_prompt, import_official, read_official

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise Sd4MatchError(f"{args.out}: already exists and is not empty; choose another --out")
    read_official(args.file)  # a bad file is named before any model loads
    _check_common(args, prompt=False)
    out = import_official(args.file, args.kind, load_model(config_from_args(ModelConfig, args)), args.out, dino=args.dino,
                          dino_dim=feature_width(args.dino), cpm_config=args.cpm_config)
    print(describe_prompt(out))
    return 0


def cmd_prompts_push(args) -> int:
    from sd4match.prompts.hub import push_prompt

    url = push_prompt(args.folder, args.repo, score=args.score, private=args.private, token=args.token, revision=args.revision)
    print(f"pushed {args.folder} to {args.repo}: {url}\nuse it with --prompt hf://{args.repo}")
    return 0


def cmd_prompts_show(args) -> int:
    from sd4match.prompts import parse_prompt
    from sd4match.prompts.official import describe_prompt

    folder = parse_prompt(args.folder).folder if args.folder.startswith("hf://") else Path(args.folder)
    print(describe_prompt(folder))
    return 0


def cmd_download(args) -> int:
    from sd4match.checks import check_output_folder
    from sd4match.data.download import download

    check_output_folder(args.root, "--root")
    root = download(args.dataset, args.root, mirror=args.mirror, progress=not args.no_progress)
    print(f"{args.dataset} is in {root}; check it with: sd4match datasets check --dataset {args.dataset} --root {root}", file=sys.stderr)
    return 0


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder; an error leaves ``path`` as it was."""
    from sd4match.fileio import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``sd4match: warning: <message>`` for sd4match's warnings; others as Python prints them."""
    if issubclass(category, Sd4MatchWarning):
        print(f"sd4match: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _joined_points(argv: list[str]) -> list[str]:
    """``--points "-3,5"`` as ``--points=-3,5``: argparse reads a value that starts with a minus
    and is no plain number as an option, so a point left of the picture was "expected one
    argument" instead of the line that names the point."""
    out = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] == "--points" and a.startswith("-") and "," in a:
            out[-1] = f"--points={a}"
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    # transformers' notices about optional packages (torchvision, ...) are not for our users;
    # its warnings that matter still show when TRANSFORMERS_VERBOSITY is set
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(_joined_points(sys.argv[1:] if argv is None else list(argv)))
    # a scheduler's SIGTERM ends a command as Ctrl-C does (unless this process was told to ignore it)
    in_main = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    before = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        with warnings.catch_warnings():  # sd4match's own warnings as one line each, for this command only
            warnings.showwarning = _show_warning
            rc = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left is noticed while it can be handled
        return rc
    except BrokenPipeError:  # `sd4match pairs ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere, quietly
        return 0
    except Sd4MatchError as e:
        if args.debug:
            raise
        print(f"sd4match: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"sd4match: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        said = _out_of_memory(e)
        if said is None or args.debug:
            raise
        print(_stopped_line(args, f"error: out of memory ({said}): {_memory_hint(args)}"), file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"sd4match: stopped: {e}", file=sys.stderr)
        return 128 + signal.Signals[e.signal_name].value
    except _Terminated:
        print(_stopped_line(args, "stopped by SIGTERM"), file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(_stopped_line(args, "interrupted"), file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, before)


def _out_of_memory(e: RuntimeError) -> str | None:
    """torch's own first words for an out-of-memory error (a GPU's, MPS's or the CPU
    allocator's: the model, the batch and what it tried to allocate), else None."""
    text = str(e)
    if type(e).__name__ != "OutOfMemoryError" and not any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory")):
        return None
    return text.split("\n")[0].split(" Including non-PyTorch")[0].split(" If reserved")[0].strip().rstrip(".")


def _memory_hint(args) -> str:
    """What of this command's own flags lowers its peak memory (out of memory is the most
    common failure on a smaller GPU). A resumed evaluation keeps its VAE batch (its bits are
    part of the run's settings): that one only in a new --out."""
    has = {f: hasattr(args, f.lstrip("-").replace("-", "_")) for f in ("--micro-batch", "--max-batch", "--vae-batch", "--store-gb")}
    resumed = args.command in ("evaluate", "sweep", "reproduce")
    at_least = {f: getattr(args, f.lstrip("-").replace("-", "_"), None) == 1 for f in has}  # already 1: nothing to lower
    flags = [f for f in ("--micro-batch", "--max-batch", "--vae-batch") if has[f] and not at_least[f] and not (resumed and f == "--vae-batch")]
    if has["--store-gb"]:
        flags.append("--store-gb (stored maps stay on the device)")
    hint = ("lower " + " or ".join([", ".join(flags[:-1]), flags[-1]] if len(flags) > 1 else flags)) if flags else "use a device with more memory"
    if resumed and has["--vae-batch"] and not at_least["--vae-batch"]:
        hint += "; --vae-batch too, in a new --out"
    if getattr(args, "dtype", None) == "fp32":
        hint += "; or use --dtype bf16 (fp16 on older GPUs)"
    return hint


class _Terminated(BaseException):
    """SIGTERM while a command runs (outside a training loop, which stops at its next step)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


#: how a command that keeps its work as it goes is continued after it was stopped
CONTINUE = {
    "evaluate": "the same command with --resume continues it",
    "train": "the same command with --resume-or-start continues it from its last checkpoint",
    "sweep": "the same command continues it (done cells are kept, a cut one resumes)",
    "reproduce": "the same command continues it (done rows are kept, a cut one resumes)",
    "features": "the same command continues it (stored maps are kept)",
    "transfer": "the same command continues it",
}


def _stopped_line(args, what: str) -> str:
    hint, out = CONTINUE.get(args.command), getattr(args, "out", None)
    if args.command == "transfer" and out is not None:  # beside its --out, which stays as an earlier run left it
        from sd4match.usermatch import transfer_partial

        out = transfer_partial(out)
    return f"sd4match: {what}" + (f"; what was done is kept in {out}: {hint}" if hint and out is not None else "")
