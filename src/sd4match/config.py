"""Typed settings, single-sourced: each stage's frozen dataclass declares its fields once, with
their help in the field's metadata; the command line makes its flags from them
(``sd4match.cli``) and files read into them are checked against them (``from_dict``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

from sd4match.errors import Sd4MatchError, first_line
from sd4match.fileio import read_user_text

C = TypeVar("C")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None, flag: str | None = None,
            cli: bool = True, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None, parse: Callable[[str], Any] | None = None,
            default_text: str | None = None, required: bool = False, at_least: float | None = None, above: float | None = None,
            spelling: Callable[[str], str] | None = None) -> Any:
    """A dataclass field with what the command line needs to know about it.

    Args:
        default: the default value (or ``factory`` for a mutable one).
        help: one line for ``--help`` (the default is appended once, by the CLI).
        flag: the flag's name without ``--`` when it is not the field's name with dashes.
        cli: False keeps the field off the command line.
        choices: the allowed values (or a function giving them: registries fill late);
            ``Literal`` fields have theirs from the annotation.
        parse: turns the flag's text into the value (default: the annotation's type).
        default_text: how ``--help`` words the default, when the value alone would mislead.
        required: the command line asks for it although the library has a default.
        at_least, above: a number's bounds (``check_settings``): value >= at_least, value > above.
        spelling: text -> the choice it names (other spellings of a choice, e.g. ``pf-willow``),
            on the command line and in Python alike; the choices are checked after it.
    """
    meta = {"help": help, "flag": flag, "cli": cli, "choices": choices, "parse": parse, "default_text": default_text, "required": required,
            "at_least": at_least, "above": above, "spelling": spelling}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def field_base_type(cls, f: dataclasses.Field) -> Any:
    """A field's annotation with ``None`` taken out of an optional (``int | None`` -> ``int``)."""
    tp = field_types(cls)[f.name]
    if typing.get_origin(tp) in (typing.Union, type(int | None)):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def field_choices(cls, f: dataclasses.Field) -> tuple | None:
    """The values a field may take: its ``Literal`` annotation's, or its metadata's."""
    meta = f.metadata.get("choices")
    if meta is not None:
        return tuple(meta() if callable(meta) else meta)
    base = field_base_type(cls, f)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def check_settings(cfg) -> None:
    """Every field holds what it may (``None`` passes where the field allows it): one of its
    choices; a whole number where the field is an ``int``, a finite number where it is a
    ``float`` (an int becomes a float); within its bounds (``at_least``, ``above``). One line
    names the setting otherwise, before anything runs."""
    cls = type(cfg)
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f.metadata.get("flag") or f.name.replace("_", "-")
        if value is None:
            continue
        base = field_base_type(cls, f)
        if typing.get_origin(base) is tuple:  # a list, or text as the flag takes it ("cat,dog"), not its characters
            value = _as_tuple(value, name, f, typing.get_args(base)[0])
            object.__setattr__(cfg, f.name, value)
            continue
        if base is bool:
            if not isinstance(value, bool) and getattr(getattr(value, "dtype", None), "kind", "") != "b":  # numpy's bools too
                raise Sd4MatchError(f"{name} {value!r}: expected true or false")
            object.__setattr__(cfg, f.name, bool(value))
            continue
        if f.metadata.get("spelling") is not None and isinstance(value, str):
            value = f.metadata["spelling"](value)
            object.__setattr__(cfg, f.name, value)
        allowed = field_choices(cls, f)
        if allowed is not None and value not in allowed:
            raise Sd4MatchError(f"{name} {value!r}: expected one of {', '.join(map(str, allowed))}")
        if base in (int, float):  # numpy's numbers too; stored as Python's
            whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if base is int and not whole:
                raise Sd4MatchError(f"{name} {value!r}: expected a whole number")
            if base is float and not (whole or isinstance(value, numbers.Real) and math.isfinite(value)):
                raise Sd4MatchError(f"{name} {value!r}: expected a finite number")
            value = base(value)
            object.__setattr__(cfg, f.name, value)
        lo, gt = f.metadata.get("at_least"), f.metadata.get("above")
        if lo is not None and value < lo:
            raise Sd4MatchError(f"{name} {value!r}: must be at least {lo:g}")
        if gt is not None and value <= gt:
            raise Sd4MatchError(f"{name} {value!r}: must be above {gt:g}")


def _as_tuple(value, name: str, f: dataclasses.Field, item: type) -> tuple:
    """A sequence setting as a tuple of ``item``: text through the field's ``parse`` (as the
    flag reads it; names by default), a list or tuple item by item."""
    if isinstance(value, str):
        try:
            return tuple((f.metadata.get("parse") or parse_names)(value))
        except ValueError as e:
            raise Sd4MatchError(f"{name} {value!r}: {e}") from None
    if not isinstance(value, (list, tuple)):
        raise Sd4MatchError(f"{name} {value!r}: expected a list or comma-separated text")
    if item is float:
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise Sd4MatchError(f"{name} {list(value)!r}: expected finite numbers")
        return tuple(dict.fromkeys(float(v) for v in value))  # each once, in the order given
    if not all(isinstance(v, str) for v in value):
        raise Sd4MatchError(f"{name} {list(value)!r}: expected names")
    return tuple(dict.fromkeys(value))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def from_dict(cls: type[C], d: dict, what: str = "setting") -> C:
    """``cls(**d)``, naming an unknown key in one line. Numbers written as text (YAML reads
    ``1e-2`` as a string: YAML 1.1 floats need a dot) become numbers where the field is one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields), key=str)
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise Sd4MatchError(f"unknown {what} {unknown[0]!r}{hint}; known: {', '.join(sorted(fields))}")
    d = dict(d)
    for k, v in d.items():
        base = field_base_type(cls, fields[k])
        if base in (int, float) and isinstance(v, str):
            try:
                d[k] = base(v.strip())
            except ValueError:
                pass  # check_settings names it
        elif base is bool and (isinstance(v, str) or type(v) is int):  # 'yes', "true", 1 as a file may hold them
            word = str(v).strip().lower()
            d[k] = True if word in _TRUE else False if word in _FALSE else v  # anything else: check_settings names it
    return cls(**d)


def as_dict(cfg) -> dict:
    """The settings as plain data (lists for sequences), in field order."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# ------------------------------------------------------------------------------ closed sets of names
#: The kinds of prompt this release ships (``sd4match.prompts.PROMPT_CLASSES`` registers their
#: classes; a test checks the two agree).
PromptKind = Literal["text", "empty", "single", "category", "cpm", "cpm-image", "hidden", "hidden-category"]
#: The kinds ``sd4match train`` learns.
LearnedKind = Literal["single", "category", "cpm", "cpm-image", "hidden", "hidden-category"]
#: The kinds the authors released prompt files of (``sd4match prompts import --kind``; ``hidden``
#: takes a Single or a Class HiddenState file).
ImportKind = Literal["single", "category", "cpm", "hidden"]
#: Dataset readers (``sd4match.data.DATASETS``; a test checks the two agree).
DatasetName = Literal["spair", "spair-u", "pfpascal", "pfwillow", "ap10k", "cub", "mp100", "synthetic", "custom"]
#: How the benchmarks' own papers and folders spell them (``dataset_name``).
DATASET_SPELLINGS = {"spair-71k": "spair", "spair71k": "spair", "spairu": "spair-u", "pf-pascal": "pfpascal", "pf-willow": "pfwillow",
                     "ap-10k": "ap10k", "cub-200-2011": "cub", "cub-200": "cub", "cub200": "cub", "mp-100": "mp100"}


def dataset_name(text: str) -> str:
    """A dataset's name as sd4match spells it, from any case and the benchmarks' own spellings
    (``SPair-71k``, ``PF-Willow``, ``pf_pascal``, ``AP-10K``, ``CUB-200-2011``, ``MP-100``); other
    text is returned as it is (the caller refuses it)."""
    key = text.strip().lower().replace("_", "-")
    key = DATASET_SPELLINGS.get(key, key)
    return key if key in typing.get_args(DatasetName) else text
#: PF-Willow's sub-classes by the PF-Pascal (VOC) class each shows, as the official code maps
#: them: a category prompt, or a training set, that knows the class knows the sub-class.
CATEGORY_ALIASES = {"car": "car", "duck": "bird", "motorbike": "motorbike", "winebottle": "bottle"}


def base_category(name: str) -> str:
    """PF-Willow sub-class names as the official code words them: ``car(G)`` -> ``car``."""
    return name.split("(", 1)[0] if "(" in name else name


def category_words(name: str) -> str:
    """A category's name as a text prompt words it: its base name (``car(G)`` -> ``car``) with
    underscores read as spaces (CUB's ``Black_footed_Albatross``, MP-100's ``giraffe_body``)."""
    return " ".join(base_category(name).replace("_", " ").split())


def category_names(name: str) -> tuple[str, ...]:
    """The names a category goes by, most specific first: itself, its base name
    (``duck(S)`` -> ``duck``) and the PF-Pascal class that shows (``bird``)."""
    base = base_category(name)
    return tuple(dict.fromkeys(n for n in (name, base, CATEGORY_ALIASES.get(base)) if n))


IMAGES_HELP = "spair-u: the SPair-71k folder holding JPEGImages/, when --root holds SPair-U's annotations alone"
ALL_PAIRS_HELP = "cub: every within-class pair of the split, not DistillDIFT's 1,000 (seed 42)"
SPLIT_HELP = ("trn, val or test (SPair-71k, PF-Pascal; custom: its trn.jsonl, val.jsonl, test.jsonl); ap10k also test_cross_species, test_cross_family, val_cross_*; cub: train, test; "
              "mp100: animal_body_unseen, animal_face, clothing, furniture, human_face")
#: The four match rules, the paper's first (``sd4match.matching``).
MatchRule = Literal["kernel-softargmax", "softargmax", "nn", "bilinear"]
MATCH_RULES: tuple[str, ...] = typing.get_args(MatchRule)
#: ``evaluate --match``: one rule, or ``all`` four from one feature extraction (as the official evaluator reports them)
EvalRule = Literal[MatchRule, "all"]
#: PCK protocols (DESIGN.md): the official code's 768 x 768 frame, or original pixels.
Protocol = Literal["sd4match", "standard"]
PROTOCOL_HELP = "sd4match = the official SD4Match code's frame (768 x 768); standard = the field's common frame (original pixels)"
DType = Literal["auto", "fp32", "bf16", "fp16"]
#: ``--compile``: off, on (torch.compile's default mode), auto (on with CUDA), or a torch.compile mode
#: (reduce-overhead: CUDA graphs of the fixed call shapes; max-autotune: autotuned kernels, and graphs)
CompileMode = Literal["auto", "on", "off", "reduce-overhead", "max-autotune"]
#: torch.compile modes (``SDFeaturizerConfig.compile_mode``); reduce-overhead and max-autotune capture CUDA graphs
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: ``--channels-last``, ``--cudnn-benchmark``: on, off, or auto (on for the device types in ``KERNELS_AUTO``)
Switch = Literal["auto", "on", "off"]
#: ``--attention``: torch's scaled-dot-product-attention backend (``auto``: torch picks per call)
Attention = Literal["auto", "flash", "efficient", "cudnn", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(Attention)
#: What ``auto`` turns on, per device type: the kernel settings that ``benchmarks/pipeline.py --levers``
#: measured faster there (benchmarks/RESULTS.md). Empty until a GPU run has measured them.
KERNELS_AUTO: dict[str, tuple[str, ...]] = {"channels_last": (), "cudnn_benchmark": ()}
KERNEL_HELP = {
    "channels_last": "the UNet's and VAE's weights and inputs in channels-last (NHWC) memory format (auto: off until measured faster; "
                     "features move by float noise only)",
    "attention": "attention kernel of the UNet and VAE: auto (torch picks) or flash, efficient, cudnn, math (one backend, refused where "
                 "this device has none for the model's shapes)",
    "cudnn_benchmark": "cuDNN times its convolution algorithms once per shape and keeps the fastest, during sd4match's model calls only "
                       "(auto: off until measured faster)",
}
DinoInput = Literal["official", "imagenet"]
#: How DINOv2's learned position grid is resized (``sd4match.features.dino.DINO_POS``).
DinoPos = Literal["official", "transformers"]


def compile_choice(mode: str, device_type: str) -> tuple[bool, str]:
    """(compile or not, torch.compile mode) of a ``--compile`` value on a device type."""
    if mode == "off" or (mode == "auto" and device_type != "cuda"):
        return False, "default"
    return True, mode if mode in TORCH_COMPILE_MODES else "default"


def kernel_choice(cfg, device_type: str) -> dict[str, Any]:
    """The featurizer's kernel settings (``channels_last``, ``attention``, ``cudnn_benchmark``)
    of a settings object with the ``--channels-last`` / ``--attention`` / ``--cudnn-benchmark``
    fields, on a device type."""
    def on(name: str) -> bool:
        v = getattr(cfg, name)
        return v == "on" or (v == "auto" and device_type in KERNELS_AUTO[name])

    return {"channels_last": on("channels_last"), "attention": cfg.attention, "cudnn_benchmark": on("cudnn_benchmark")}
#: What ``sd4match train`` trains: the prompt, UNet adapters, or both.
AdaptMode = Literal["prompt", "lora", "prompt+lora", "finetune", "prompt+finetune"]
#: What a CPM's conditional rows are made from (``sd4match.prompts.cpm.CPM_INPUTS``).
CpmInput = Literal["patches", "cls", "mean"]
DINO_POS_HELP = ("DINOv2 position embeddings: official (the DINOv2 authors' and transformers 4.35 interpolation, the released CPM prompts' environment) or transformers (the installed version's)")
DEFAULT_ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.15)
NOISE_SCHEDULE_TEXT = ("noise at t through the model's own scheduler (model), or <class>[:<beta schedule>]: DDPM, DDIM, PNDM, Euler, "
                       "EulerAncestral, DPMSolver, LMS, Heun; linear, scaled_linear, squaredcos_cap_v2 (e.g. DDIM, model:linear)")
#: What matching and the loss compare (``sd4match.matching.SIMILARITIES``).
Similarity = Literal["cosine", "dot"]
SIMILARITY_HELP = "cosine (descriptors L2-normalised, the official default) or dot (raw dot products: the official dift/fuseDino configs)"


def parse_names(text: str) -> tuple[str, ...]:
    """``"cat,dog"`` -> ("cat", "dog")."""
    vals = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not vals:
        raise ValueError(f"{text!r} names nothing")
    return vals


def parse_alphas(text: str) -> tuple[float, ...]:
    """``"0.05,0.1"`` -> (0.05, 0.1); each in (0, 1]."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None
    return alpha_values(vals, text)


def alpha_values(values, given=None) -> tuple[float, ...]:
    """PCK thresholds as floats, each once (0.1 and 0.10 are one), each in (0, 1]; else a
    ValueError naming what was ``given`` (``values`` by default)."""
    shown = values if given is None else given
    try:
        vals = tuple(dict.fromkeys(float(v) for v in values))
    except (TypeError, ValueError):
        raise ValueError(f"alphas must be numbers in (0, 1], got {shown!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise ValueError(f"alphas must lie in (0, 1], got {shown!r}")
    return vals


# ------------------------------------------------------------------------------ matching
@dataclass(frozen=True)
class MatchConfig:
    """How a query descriptor becomes a target point (``sd4match.matching.match``)."""

    rule: MatchRule = setting("kernel-softargmax", "match rule", flag="match")
    temperature: float = setting(0.04, "softmax temperature of the soft-argmax rules", above=0)
    sigma: float = setting(7.0, "kernel-softargmax: sigma of the Gaussian window, in cells", above=0)
    similarity: Similarity = setting("cosine", SIMILARITY_HELP)

    def __post_init__(self):
        check_settings(self)

    def kwargs(self) -> dict[str, Any]:
        """The rule's keyword arguments for ``match`` / ``match_pixels``."""
        return {"temperature": self.temperature, "sigma": self.sigma, "similarity": self.similarity}


#: what each match rule reads besides the correlation (``sd4match.matching``'s rules)
RULE_SETTINGS: dict[str, tuple[str, ...]] = {"nn": (), "bilinear": (), "softargmax": ("temperature",), "kernel-softargmax": ("temperature", "sigma")}


def unused_rule_settings(rule: str, temperature: float, sigma: float) -> list[str]:
    """The flags given another value than their default that ``rule`` never reads
    (``--temperature`` with ``--match nn``); ``all`` reads every one."""
    reads = RULE_SETTINGS.get(rule, ("temperature", "sigma"))
    given = {"temperature": temperature, "sigma": sigma}
    return [f"--{k}" for k, v in given.items() if k not in reads and v != getattr(MatchConfig, k)]


# ------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelConfig:
    """Which model, on which device, with which feature settings (every command that runs one)."""

    model: str = setting("sd-2-1", "registry name (sd-2-1, sd-1-5, dinov2-b, effnet-lite0), hub id, diffusers folder or "
                                   ".safetensors/.ckpt file; SD+DINOV2 (e.g. sd-2-1+dinov2-b) fuses both")
    dino_input: DinoInput = setting("official", "fused models: DINOv2 sees the picture as SD does, in [-1, 1] (official), or ImageNet-normalised")
    dino_pos: DinoPos = setting("official", DINO_POS_HELP)
    model_config: str | None = setting(None, "for a single checkpoint file: the diffusers folder or hub id with its component configs")
    device: str = setting("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    dtype: DType = setting("auto", "weights' dtype: auto = bf16 on CUDA GPUs (fp16 on older ones), fp32 on CPU; matching, softmax and loss stay fp32")
    timestep: int = setting(261, "noise level t (the official test script uses 50)", at_least=0)
    up_block: int = setting(1, "read the output of unet.up_blocks[k]", at_least=0)
    ensemble: int = setting(8, "noisy copies averaged per picture", at_least=1)
    noise_schedule: str = setting("model", NOISE_SCHEDULE_TEXT)
    resolution: int | None = setting(None, "square working size", default_text="768 for SD, 512 for effnet-lite0, 840 for DINOv2", at_least=1)
    max_batch: int | None = setting(None, "model samples per call (SD: pictures x ensemble)",
                                    default_text="the model's own: 32 for SD, 8 pictures for effnet-lite0", at_least=1)
    vae_batch: int = setting(8, "pictures per VAE call (evaluate: every call this size, the last padded; match, serve: up to it; 1: one "
                                "picture a call, the bits of sd4match before the VAE was batched)", at_least=1)
    compile: CompileMode = setting("off", "torch.compile the early-exit UNet and the VAE encoder (auto: on CUDA; compiling takes about a minute, "
                                          "then each call is faster; reduce-overhead / max-autotune: that torch.compile mode)")
    channels_last: Switch = setting("auto", KERNEL_HELP["channels_last"])
    attention: Attention = setting("auto", KERNEL_HELP["attention"])
    cudnn_benchmark: Switch = setting("auto", KERNEL_HELP["cudnn_benchmark"])

    def __post_init__(self):
        check_settings(self)


# ------------------------------------------------------------------------------ evaluate
@dataclass(frozen=True)
class EvalConfig:
    """What ``sd4match evaluate`` predicts and how it scores (besides the model)."""

    dataset: DatasetName = setting(help="benchmark name (synthetic: seeded warps of the pictures in --root)", spelling=dataset_name)
    root: str = setting(help="the dataset's own top folder (see the README's Datasets section)")
    images: str | None = setting(None, IMAGES_HELP)
    all_pairs: bool = setting(False, ALL_PAIRS_HELP)
    split: str = setting("test", SPLIT_HELP, required=True)
    prompt: str = setting("empty", "a prompt folder, 'empty', 'text' ('a photo of a {category}') or 'text:<template with {category}>'")
    rule: EvalRule = setting("kernel-softargmax", "match rule; all: the four rules from one feature extraction, a score table and "
                                                  "predictions file per rule", flag="match")
    protocol: Protocol = setting("sd4match", PROTOCOL_HELP + "; `score` defaults to standard")
    alphas: tuple[float, ...] = setting(DEFAULT_ALPHAS, "comma-separated PCK thresholds", parse=parse_alphas, default_text="0.05,0.1,0.15")
    seed: int = setting(0, "base seed of every picture's latent sample and noise")
    temperature: float = setting(0.04, "softmax temperature of the soft-argmax rules", above=0)
    sigma: float = setting(7.0, "kernel-softargmax: sigma of the Gaussian window, in cells", above=0)
    similarity: Similarity = setting("cosine", SIMILARITY_HELP)
    limit: int = setting(0, "only N pairs, each category its share (its first pairs): a quick look that covers every category; "
                            "the score then covers those N only (0: every pair)", at_least=0)
    categories: tuple[str, ...] = setting((), "only the pairs of these categories, comma-separated (each category scores as in a full run; "
                                              "the overall numbers cover these only)", parse=parse_names)
    workers: int = setting(4, "loader threads decoding ahead (0: decode in the main thread)", at_least=0)
    chunk: int = setting(32, "loader threads decode up to 2 x chunk pairs ahead", cli=False, at_least=1)
    pending: int = setting(64, "decoded pictures that pairs waiting for their features may hold (bounds memory; the predictions do not "
                               "depend on it)", flag="max-pending", at_least=2)
    skip_bad: bool = setting(False, "go past pairs with unreadable images: scored as missing and listed in score.json")
    preset: str | None = setting(None, "a zero-shot baseline's settings (dift, dinov2, sd-dino-fuse; the SD4Match authors' dift-sd4match, "
                                       "fusedino-sd4match); flags given explicitly override them",
                                 choices=lambda: sorted(EVAL_PRESETS))

    def __post_init__(self):
        check_settings(self)  # text and lists of alphas as tuples of numbers first
        if not self.alphas or any(not 0 < a <= 1 for a in self.alphas):
            raise Sd4MatchError(f"alphas {', '.join(f'{a:g}' for a in self.alphas) or '(none)'}: each must lie in (0, 1]")

    @property
    def match(self) -> MatchConfig:
        """The one rule's settings (``matches`` for ``--match all``)."""
        if self.rule == "all":
            raise Sd4MatchError("--match all evaluates four rules: use EvalConfig.matches")
        return MatchConfig(self.rule, self.temperature, self.sigma, self.similarity)

    @property
    def matches(self) -> tuple[MatchConfig, ...]:
        """The rules evaluated: one, or the four of ``--match all`` (the paper's first)."""
        rules = MATCH_RULES if self.rule == "all" else (self.rule,)
        return tuple(MatchConfig(r, self.temperature, self.sigma, self.similarity) for r in rules)


#: Zero-shot rows of published tables, each one `evaluate` (README: "Zero-shot baselines"):
#: values of ``ModelConfig`` and ``EvalConfig`` fields, each named for its source.
#: ``dift``, ``dinov2``, ``sd-dino-fuse``: the methods' own evaluations (cosine, nearest
#: neighbour); ``dift-sd4match``, ``fusedino-sd4match``: the SD4Match authors' ``config/dift.py``
#: and ``config/fuseDino.py`` (``ENABLE_L2_NORM = False``: raw dot products; their evaluator
#: reports the four rules at once).
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "dift": {"model": "sd-2-1", "timestep": 261, "up_block": 1, "ensemble": 8, "prompt": "text", "rule": "nn", "similarity": "cosine"},
    "dinov2": {"model": "dinov2-b", "resolution": 840, "prompt": "empty", "rule": "nn", "similarity": "cosine"},
    "sd-dino-fuse": {"model": "sd-2-1+dinov2-b", "timestep": 261, "up_block": 1, "ensemble": 8, "prompt": "text", "rule": "nn", "similarity": "cosine"},
    "dift-sd4match": {"model": "sd-2-1", "timestep": 261, "up_block": 1, "ensemble": 8, "prompt": "text", "rule": "all", "similarity": "dot"},
    "fusedino-sd4match": {"model": "sd-2-1+dinov2-b", "timestep": 261, "up_block": 1, "ensemble": 8, "prompt": "text", "rule": "all",
                          "similarity": "dot", "dino_input": "official", "dino_pos": "official"},
}


# ------------------------------------------------------------------------------ train
@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (written to ``<out>/config.json``)."""

    dataset: DatasetName = setting("spair", "training data", default_text="the preset's, else spair", spelling=dataset_name)
    root: str = setting("", "the dataset's top folder", required=True)
    images: str | None = setting(None, IMAGES_HELP)
    all_pairs: bool = setting(False, ALL_PAIRS_HELP)
    prompt: LearnedKind = setting("single", "prompt kind to learn", default_text="the preset's, else single")
    model: str = setting("sd-2-1", "registry name, hub id, diffusers folder or checkpoint file")
    dino: str = setting("dinov2-b", "DINOv2 model for prompts that take its tokens (cpm)")
    dino_pos: DinoPos = setting("official", DINO_POS_HELP)
    cpm_input: CpmInput = setting("patches", "cpm, cpm-image: condition on DINOv2 patch tokens (the paper), the pooled CLS token (the official "
                                             "Head) or the patches' mean")
    global_tokens: int = setting(25, "cpm, cpm-image: learned global rows (0: the official G0)", at_least=0)
    cond_tokens: int = setting(50, "cpm, cpm-image: conditional rows", at_least=1)
    cpm_plain: bool = setting(False, "cpm, cpm-image: the rows are the projection of the DINOv2 tokens alone (no global rows, positional "
                                     "embedding or gate): image conditioning without learned prompt rows")
    timestep: int = setting(261, "noise level t", at_least=0)
    up_block: int = setting(1, "feature block k: the output of unet.up_blocks[k]", at_least=0)
    ensemble: int = setting(1, "noisy copies in training", at_least=1)
    noise_schedule: str = setting("model", NOISE_SCHEDULE_TEXT)
    resolution: int = setting(768, "working size", at_least=1)
    temperature: float = setting(0.04, "softmax temperature of the loss", above=0)
    similarity: Similarity = setting("cosine", "what the loss compares: " + SIMILARITY_HELP)
    window: int = setting(7, "side of the loss target's Gaussian window, in cells", at_least=1)
    sigma: float = setting(1.5, "sigma of the loss target's Gaussian window, in cells", above=0)
    lr: float = setting(1e-2, "learning rate of tokens, embeddings and gate", above=0)
    lr_linear: float = setting(1e-3, "learning rate of the CPM linear layers", above=0)
    adapt: AdaptMode = setting("prompt", "what is trained: the prompt (the paper), LoRA adapters on the UNet's attention, both, or the UNet's "
                                         "weights up to the feature block (finetune)")
    fixed_prompt: str = setting("empty", "--adapt lora / finetune: the prompt the UNet is adapted under ('empty', 'text', 'text:<words>' or a "
                                         "prompt folder)")
    lora_rank: int = setting(4, "LoRA rank r", at_least=1)
    lora_alpha: float = setting(4.0, "LoRA scale alpha (the update is alpha / r * B A)", above=0)
    lora_targets: tuple[str, ...] = setting(("to_q", "to_k", "to_v", "to_out.0"), "module-name suffixes of the linear layers LoRA adapts",
                                            parse=parse_names, default_text="to_q,to_k,to_v,to_out.0")
    finetune_blocks: tuple[str, ...] = setting((), "--adapt finetune: the blocks trained (e.g. up_blocks.1,up_blocks.0)", parse=parse_names,
                                               default_text="every block up to the feature block")
    lr_adapter: float = setting(1e-4, "learning rate of LoRA tensors (1e-4) or fine-tuned weights (use 1e-5)", above=0)
    batch_size: int = setting(9, "pairs per optimiser step (effective batch)", at_least=1)
    micro_batch: int = setting(1, "pairs per forward pass; batch-size / micro-batch accumulation steps", at_least=1)
    steps: int = setting(30000, "optimiser steps (replaces the preset's epochs; may grow on --resume)", default_text="30000, or the preset's epochs", at_least=1)
    epochs: float = setting(0, "> 0: passes over the training pairs instead of --steps (the presets: SPair-71k 5, PF-Pascal 90)", at_least=0)
    val_every: int = setting(-1, "validate every N steps; -1: once per epoch (the official schedule); 0: never", at_least=-1)
    val_rule: MatchRule = setting("nn", "match rule of validation (nn: the official model selection)")
    val_pairs: int = setting(0, "validate on N val pairs, each category its share (as evaluate --limit; 0: all)", at_least=0)
    val_ensemble: int = setting(1, "noisy copies in validation", at_least=1)
    ckpt_every: int = setting(500, "steps between checkpoints", at_least=1)
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest)", at_least=1)
    seed: int = setting(0, "seed of the data order and of every random draw")
    amp_dtype: Literal["bf16", "fp16"] | None = setting(None, "autocast the frozen models in this dtype (GPU), weights in fp32", default_text="off")
    apply_flip: bool = setting(True, "PF-Pascal trn: mirror the pairs whose flip flag is set, as the official code does")
    max_kps: int = setting(0, "keypoints per pair used in the loss (0: all)", at_least=0)
    categories: tuple[str, ...] = setting((), "train (and validate) on these categories only, comma-separated", parse=parse_names,
                                          default_text="all")
    exclude_categories: tuple[str, ...] = setting((), "leave these categories out of training and validation (unseen at test)",
                                                  parse=parse_names, default_text="none")
    train_split: str = setting("trn", "split to train on")
    val_split: str = setting("val", "split to validate on")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N, mps")
    dtype: DType = setting("auto", "weights' dtype: auto = bf16 on CUDA (fp16 on older GPUs), fp32 on CPU")
    workers: int = setting(4, "loader threads decoding, warping and resizing ahead (0: in the main thread)", at_least=0)
    cache_dir: str = setting("", "keep VAE posteriors and DINOv2 tokens here too, for later runs", default_text="none")
    store_gb: float = setting(8.0, "memory for VAE posteriors and DINOv2 tokens, GB (all of SPair-71k trn: about 2 GB)", at_least=0)
    compile: CompileMode = setting("auto", "torch.compile the early-exit UNet and the VAE (auto: on CUDA)")
    channels_last: Switch = setting("auto", KERNEL_HELP["channels_last"])
    attention: Attention = setting("auto", KERNEL_HELP["attention"])
    cudnn_benchmark: Switch = setting("auto", KERNEL_HELP["cudnn_benchmark"])

    def __post_init__(self):
        check_settings(self)  # text of names ("cat,dog") and lists as tuples first
        for name in ("categories", "exclude_categories", "lora_targets", "finetune_blocks"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if self.window % 2 == 0:
            raise Sd4MatchError(f"window {self.window}: must be odd (the target window is centred on the ground-truth cell)")
        if self.batch_size % self.micro_batch:
            fits = [str(d) for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            fits = f"{', '.join(fits[:-1])} or {fits[-1]}" if len(fits) > 1 else fits[0]
            raise Sd4MatchError(f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro_batch}: --micro-batch {fits} divides it")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_dict(cls, d, "training setting")


_PAPER = dict(timestep=261, up_block=1, ensemble=1, temperature=0.04, lr=1e-2, lr_linear=1e-3, batch_size=9, val_every=-1, val_rule="nn", val_pairs=0)
_EPOCHS = {"spair": 5, "pfpascal": 90}  # = 29.6k and 29.4k steps of 9 pairs
#: The paper's settings (DESIGN.md), one per prompt kind and training set: Adam at a constant
#: lr, batch 9, 5 epochs of SPair-71k or 90 of PF-Pascal, model selection once per epoch by
#: nearest-neighbour PCK@0.1 on the whole val split (sd4match protocol, per image).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    f"{kind}-{ds}": {**_PAPER, "prompt": kind, "dataset": ds, "epochs": _EPOCHS[ds]} for kind in ("single", "category", "cpm") for ds in ("spair", "pfpascal")
}


def load_train_config(preset: str | None = None, yaml_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Preset, then YAML, then explicit overrides (None values are ignored)."""
    d: dict[str, Any] = {}
    if preset:
        if preset not in TRAIN_PRESETS:
            raise Sd4MatchError(f"unknown preset {preset!r}; presets: {', '.join(TRAIN_PRESETS)}")
        d.update(TRAIN_PRESETS[preset])
    if yaml_file:
        import yaml  # only for a YAML file: keeps `sd4match --help` fast

        try:
            y = yaml.safe_load(read_user_text(yaml_file)) or {}
        except yaml.YAMLError as e:  # its text spans lines and draws a caret: one line, with the place
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise Sd4MatchError(f"{yaml_file}: not valid YAML{where} ({getattr(e, 'problem', None) or first_line(e)})") from None
        except OSError as e:
            raise Sd4MatchError(f"{yaml_file}: cannot read settings ({e})") from None
        if not isinstance(y, dict):
            raise Sd4MatchError(f"{yaml_file}: expected a mapping of settings")
        d.update({k.replace("-", "_") if isinstance(k, str) else k: v for k, v in y.items()})  # micro-batch, as the flag spells it
    given = {k: v for k, v in overrides.items() if v is not None}
    if "steps" in given and "epochs" not in given:  # an explicit step count replaces a preset's epochs
        d["epochs"] = 0
    d.update(given)
    return TrainConfig.from_dict(d)
