"""What every prompt shares: the batch it reads, what it declares, save and load.

A prompt turns a batch into ``encoder_hidden_states`` for the UNet: (B or 1, 77, D).
Learned prompts are rows of CLIP's *embedding-layer output* (token + position
embedding), as in the official SD4Match code, run through the model's own frozen text
encoder by a ``TextEncoderBridge`` (``sd4match.features.text``; a featurizer that takes
prompts offers one as ``featurizer.text_bridge``).

Each kind is one class that declares how it behaves (``per_pair``, ``needs_dino``,
``uses_category``, ``learned``) and registers itself with ``@register``; the stages ask
these declarations, never the kind's name. A new kind is one new module plus its import in
``sd4match/prompts/__init__.py``.

Saved as a folder: ``prompt.safetensors`` (the tensors) + ``config.json``.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sd4match.config import PromptKind, base_category, category_words  # noqa: F401  (the prompts' public names too)
from sd4match.errors import Sd4MatchError, first_line
from sd4match.features.text import TextEncoderBridge
from sd4match.fileio import atomic_path, atomic_write_text

#: The kinds this release ships (``config.PromptKind``; ``PROMPT_CLASSES`` holds every registered one).
PROMPT_KINDS: tuple[str, ...] = typing.get_args(PromptKind)
N_TOKENS = 75  # learnable rows between BOS and EOS in CLIP's 77
#: The prompt folder format. 2: learned rows are embedding-layer outputs (token + position),
#: the CPM gate is element-wise; folders of format 1 (token embeddings, CLIP added positions,
#: scalar gate) cannot be read as format 2.
PROMPT_FORMAT = "sd4match-prompt-2"

#: kind -> class, filled by ``@register`` as each kind's module is imported.
PROMPT_CLASSES: dict[str, type["Prompt"]] = {}


def register(cls: type["Prompt"]) -> type["Prompt"]:
    """Class decorator: make ``cls`` the prompt of kind ``cls.kind``."""
    if not cls.kind or cls.kind in PROMPT_CLASSES:
        raise ValueError(f"prompt kind {cls.kind!r} is empty or registered twice")
    PROMPT_CLASSES[cls.kind] = cls
    return cls


def prompt_class(kind: str) -> type["Prompt"]:
    """The class of prompt ``kind``; an unknown kind raises, naming the known ones."""
    try:
        return PROMPT_CLASSES[kind]
    except KeyError:
        raise Sd4MatchError(f"unknown prompt kind {kind!r}; expected one of {', '.join(PROMPT_CLASSES)}") from None


def kind_summary(kind: str, *, markdown: bool = False) -> str:
    """What a prompt kind is, in one line: its class docstring's first paragraph, whole (its
    first line alone cut sentences short), with reST's double backquotes as plain text or,
    for ``markdown``, as code spans."""
    doc = (PROMPT_CLASSES[kind].__doc__ or kind).strip().split("\n\n", 1)[0]
    return " ".join(doc.split()).replace("``", "`" if markdown else "")


def learned_kinds() -> tuple[str, ...]:
    """The kinds ``sd4match train`` can learn."""
    return tuple(k for k, c in PROMPT_CLASSES.items() if c.learned)


@dataclass
class PromptConfig:
    """What a saved prompt was made for and how (``config.json``)."""

    kind: str
    text_dim: int  # width of the text encoder it was made for
    n_tokens: int = N_TOKENS
    model: str = ""  # model id (hub id@revision, folder, file) it was trained with
    timestep: int | None = None
    up_block: int | None = None
    template: str | None = None  # text prompts
    categories: list[str] = field(default_factory=list)
    n_global: int | None = None  # CPM
    n_cond: int | None = None
    dino_dim: int | None = None
    n_patches: int | None = None
    dino_model: str | None = None
    cpm_input: str | None = None  # CPM: patches (None), cls or mean
    cpm_plain: bool | None = None  # CPM: rows are the projection alone (no global rows, positional embedding or gate)
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # data, split, step, ... or where it was imported from
    format: str = PROMPT_FORMAT

    def __post_init__(self):
        if self.kind not in PROMPT_CLASSES:
            raise ValueError(f"unknown prompt kind {self.kind!r}; expected one of {', '.join(PROMPT_CLASSES)}")


class Prompt(nn.Module):
    """Base of all prompts.

    Call with a batch dict: ``{"categories": [B strings], "dino_src": (B, P, C),
    "dino_trg": (B, P, C)}`` (keys a prompt does not need may be absent) and get
    (B or 1, 77, D) prompt embeddings.
    """

    kind: ClassVar[str] = ""
    #: the prompt depends on both images of a pair: feature maps are made per pair, not per picture
    per_pair: ClassVar[bool] = False
    #: its batch must hold the DINOv2 tokens of both images (``dino_src``, ``dino_trg``)
    needs_dino: ClassVar[bool] = False
    #: its output may depend on the batch's categories (so a stored map is named by category)
    uses_category: ClassVar[bool] = False
    #: ``sd4match train`` learns it
    learned: ClassVar[bool] = False
    #: its output depends on each picture's own DINOv2 tokens (``batch["dino"]``): one prompt a picture
    per_picture_condition: ClassVar[bool] = False

    def __init__(self, bridge: TextEncoderBridge, config: PromptConfig):
        super().__init__()
        self.bridge = bridge
        self.config = config

    @property
    def learnable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @property
    def dino_part(self) -> str:
        """Which DINOv2 tokens its batch holds (``needs_dino``): ``patches`` or ``cls``."""
        return "patches"

    @property
    def requires_category(self) -> bool:
        """Whether a call must be given the categories of its batch."""
        return self.uses_category

    def store_tag(self, category: str) -> str:
        """What of ``category`` its output depends on (stored maps are named by it): the name
        itself; a text prompt, the text it writes for it."""
        return category

    @classmethod
    def create(cls, bridge: TextEncoderBridge, *, categories=(), template: str = "", seed: int = 0, **kw) -> "Prompt":
        """A new prompt of this kind (``make_prompt``); a kind takes the arguments it uses."""
        return cls(bridge, seed=seed, **kw)

    def param_groups(self, lr: float, lr_linear: float) -> list[dict]:
        """Adam's parameter groups: every parameter at ``lr`` (a kind with linear layers
        puts those at ``lr_linear``, as the paper trains the CPM)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    # -------------------------------------------------------------- save / load
    def save(self, folder: str | Path, **training) -> Path:
        """Write ``prompt.safetensors`` + ``config.json`` into ``folder``; return it.

        Files are written under temporary names and renamed, so an existing prompt is
        never left half-overwritten.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if training:
            self.config.training = {**self.config.training, **training}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / "prompt.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"kind": self.config.kind})
        atomic_write_text(folder / "config.json", json.dumps(asdict(self.config), indent=2))
        return folder


def check_template(template: str, where: str = "text prompt template ") -> str:
    """A text template holds no replacement field but ``{category}`` (literal braces doubled:
    ``{{`` and ``}}``); else one line naming it (before: KeyError or ValueError when the
    first batch was encoded, after the model had loaded)."""
    try:
        fields = _template_fields(template)
    except ValueError as e:
        raise Sd4MatchError(f"{where}{template}: {e} (write {{{{ and }}}} for a literal brace)") from None
    bad = [f for f in fields if f != "category"]
    if bad:
        raise Sd4MatchError(f"{where}{template}: {{{bad[0]}}} is not a field; a template may hold {{category}} only "
                            "(write {{ and }} for a literal brace)")
    return template


def template_uses_category(template: str) -> bool:
    """Whether a (checked) text template holds the field ``{category}`` (``{{category}}`` is literal text)."""
    return "category" in _template_fields(template)


def _template_fields(template: str) -> list[str]:
    """The replacement fields of a text template, as ``str.format`` reads it (ValueError on an unclosed brace)."""
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def not_a_prompt_folder(folder: Path) -> str | None:
    """What ``folder`` is instead, when it is the run or evaluation folder a prompt is
    often mistaken for (``runs/cpm-spair`` for ``runs/cpm-spair/best``)."""
    inner = [n for n in ("best", "last") if (folder / n / "config.json").is_file()]
    if inner:
        return f"{folder}: a training run's folder, not a prompt folder: its prompts are {' and '.join(str(folder / n) for n in inner)}"
    if (folder / "score.json").is_file():
        return f"{folder}: an evaluation's folder, not a prompt folder (its score.json names the prompt it evaluated)"
    return None


def read_prompt_config(folder: str | Path) -> PromptConfig:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    other = not_a_prompt_folder(folder)
    if other:
        raise Sd4MatchError(other)
    if not cfg_path.is_file():
        raise Sd4MatchError(f"{folder}: not a prompt folder (config.json is missing)")
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = PromptConfig(**raw)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise Sd4MatchError(f"{cfg_path}: not a valid prompt config ({e})") from None
    if cfg.format != PROMPT_FORMAT and PROMPT_CLASSES[cfg.kind].learned:
        raise Sd4MatchError(f"{cfg_path}: prompt format {cfg.format!r} is from an older sd4match whose learned prompts are parameterised "
                            f"differently; it cannot be read as {PROMPT_FORMAT!r}: train it again (or import the official files)")
    return cfg


def describe_training(training: dict) -> str:
    """A prompt folder's training record in words (``prompts show``, the hub model card):
    where it came from or what it was trained on, its validation score and what it cost."""
    if training.get("imported_from"):
        src = training["imported_from"]
        return f"imported from the authors' released {src.get('file')} (sha256 {src.get('sha256')})"
    if not training:
        return "not recorded"
    parts = [f"{training.get('dataset', '?')}/{training.get('split', '?')}" + (f", step {training['step']:,}" if "step" in training else "")]
    cats = training.get("categories") or []
    if cats:
        parts.append(f"categories ({len(cats)}): {', '.join(cats)}")
    if training.get("val_pck") is not None:
        parts.append(f"validation PCK@0.1 {100 * training['val_pck']:.2f} %")
    cost = training.get("cost") or {}
    spent = [f"{cost['trainable_params']:,} trainable parameters ({cost.get('adapt', training.get('adapt', 'prompt'))})" if "trainable_params" in cost else "",
             f"{cost['seconds_per_step']:.3g} s/step" if "seconds_per_step" in cost else "",
             f"peak {cost['peak_memory_mb']:,.0f} MB" if "peak_memory_mb" in cost else ""]
    if any(spent):
        parts.append(", ".join(s for s in spent if s))
    if training.get("weights"):  # the hub snapshots of the frozen models it was trained with
        parts.append("weights " + ", ".join(f"{m}@{c[:12]}" for m, c in sorted(training["weights"].items())))
    known = {"dataset", "split", "step", "categories", "val_pck", "cost", "adapt", "weights"}
    parts += [f"{k} {training[k]}" for k in sorted(training) if k not in known]
    return "; ".join(parts)


def update_training_record(folder: str | Path, **training) -> None:
    """Add to the training record of the prompt folder's ``config.json`` (its weights untouched)."""
    cfg = read_prompt_config(folder)
    cfg.training = {**cfg.training, **training}
    atomic_write_text(Path(folder) / "config.json", json.dumps(asdict(cfg), indent=2))


def read_prompt_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    path = Path(folder) / "prompt.safetensors"
    if not path.is_file():
        raise Sd4MatchError(not_a_prompt_folder(Path(folder)) or f"{path}: prompt weights are missing")
    try:
        return load(path.read_bytes())
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read prompt weights (truncated or corrupt: {first_line(e)})") from None
