"""The one grammar of ``--prompt``: ``empty``, ``text``, ``text:<template>``, a prompt folder, or
a prompt folder on the Hugging Face hub, ``hf://owner/name[@revision][/subfolder]``.

``parse_prompt`` turns the string into a ``PromptSpec`` without loading any model (a
folder's ``config.json`` is read to learn its kind), so every command can check its prompt
and learn what it needs (DINOv2 tokens, a category) in seconds; ``resolve_prompt``
(``sd4match.prompts.build``) then builds the prompt for a loaded featurizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd4match.errors import Sd4MatchError
from sd4match.prompts.base import PROMPT_CLASSES, Prompt, check_template, read_prompt_config, read_prompt_tensors, template_uses_category
from sd4match.prompts.hub import fetch_hub_prompt, is_hub_uri

#: ``--prompt text``: the official text baseline's template.
DEFAULT_TEMPLATE = "a photo of a {category}"
SPEC_HELP = "'empty', 'text' ('a photo of a {category}'), 'text:<template or words>', a prompt folder or hf://owner/name[@rev][/subfolder]"


@dataclass(frozen=True)
class PromptSpec:
    """What a ``--prompt`` string names.

    Attributes:
        kind: the prompt kind (``empty``, ``text``, or the folder's kind).
        template: the text of a ``text`` prompt.
        folder: the prompt folder, when the string names one.
    """

    kind: str
    template: str | None = None
    folder: Path | None = None

    @property
    def prompt_class(self) -> type[Prompt]:
        return PROMPT_CLASSES[self.kind]

    @property
    def per_pair(self) -> bool:
        return self.prompt_class.per_pair

    @property
    def is_empty(self) -> bool:
        """The empty prompt: what a featurizer without prompts takes (it changes nothing)."""
        return self.kind == "empty"

    @property
    def needs_dino(self) -> bool:
        return self.prompt_class.needs_dino

    @property
    def requires_category(self) -> bool:
        """Whether using it needs a category: a per-category prompt, or a text template with
        ``{category}`` (told without a model, as ``Prompt.requires_category`` is after one)."""
        return template_uses_category(self.template) if self.template is not None else self.prompt_class.uses_category


def is_keyword_prompt(spec: str) -> bool:
    """Whether ``spec`` is ``empty``, ``none``, ``text`` or ``text:<template>`` (nothing learned)
    rather than a prompt folder or hub address; told from the text alone."""
    return spec in ("empty", "none", "text") or spec.startswith("text:")


def parse_prompt(spec: str | PromptSpec) -> PromptSpec:
    """``empty`` (or ``none``), ``text``, ``text:<template>``, a prompt folder or ``hf://...`` -> its spec.

    Raises:
        Sd4MatchError: neither a keyword nor a folder; a folder without a readable
            ``config.json``.
    """
    if isinstance(spec, PromptSpec):
        return spec
    if spec in ("empty", "none"):
        return PromptSpec("empty")
    if spec == "text":
        return PromptSpec("text", template=DEFAULT_TEMPLATE)
    if spec.startswith("text:"):
        return PromptSpec("text", template=check_template(spec[len("text:"):], "--prompt text:"))
    if is_hub_uri(spec):  # downloaded once into the hub cache; a cached copy is used offline
        folder = fetch_hub_prompt(spec)
        return PromptSpec(read_prompt_config(folder).kind, folder=folder)
    folder = Path(spec)
    if not folder.is_dir():
        raise Sd4MatchError(f"--prompt {spec}: not a prompt folder, 'empty', 'text' or 'text:<words>'")
    return PromptSpec(read_prompt_config(folder).kind, folder=folder)


def check_prompt(spec: str | PromptSpec) -> PromptSpec:
    """``parse_prompt``, and a folder's tensors read too (a truncated file is named now)."""
    spec = parse_prompt(spec)
    if spec.folder is not None and spec.prompt_class.learned:
        read_prompt_tensors(spec.folder)
    return spec
