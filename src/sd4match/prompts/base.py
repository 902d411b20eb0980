"""What every prompt shares: the batch it reads, the frozen text encoder, save and load.

A prompt turns a batch into ``encoder_hidden_states`` for the UNet: (B or 1, 77, D).
Learned prompts are rows of CLIP's *embedding-layer output* (token + position
embedding), as in the official SD4Match code: the 77 x D sequence [BOS row, learned
rows, EOS row, padding rows] goes straight into the loaded model's own frozen CLIP
transformer and final LayerNorm, with no position embedding added again. The model is
not modified: a forward hook on the text model's ``embeddings`` module replaces that
module's output with the sequence for the duration of one call.

Saved as a folder: ``prompt.safetensors`` (the tensors) + ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from sd4match.errors import Sd4MatchError, first_line
from sd4match.fileio import atomic_path, atomic_write_text

PromptKind = Literal["text", "empty", "single", "category", "cpm"]
PROMPT_KINDS: tuple[str, ...] = ("text", "empty", "single", "category", "cpm")
N_TOKENS = 75  # learnable rows between BOS and EOS in CLIP's 77
#: The prompt folder format. 2: learned rows are embedding-layer outputs (token + position),
#: the CPM gate is element-wise; folders of format 1 (token embeddings, CLIP added positions,
#: scalar gate) cannot be read as format 2.
PROMPT_FORMAT = "sd4match-prompt-2"


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
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # data, split, step, ... or where it was imported from
    format: str = PROMPT_FORMAT

    def __post_init__(self):
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r}; expected one of {', '.join(PROMPT_KINDS)}")


class TextEncoderBridge:
    """Runs the frozen CLIP text encoder on text or on embedding-layer rows (not a submodule:
    its weights are not the prompt's and are never saved with it)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.dim = int(text_encoder.get_input_embeddings().weight.shape[1])
        self.length = int(tokenizer.model_max_length)
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.vocab = min(int(tokenizer.vocab_size), int(text_encoder.get_input_embeddings().weight.shape[0]))

    @property
    def embeddings(self) -> nn.Module:
        """CLIP's embedding layer (token + position embedding): ``text_model.embeddings``."""
        return getattr(self.text_encoder, "text_model", self.text_encoder).embeddings

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def template_ids(self, n: int, fill: torch.Tensor | None = None) -> torch.Tensor:
        """(1, 77) ids [BOS, n placeholders (``fill`` or 0), EOS, 0 ...]: the official layout."""
        if n > self.length - 2:
            raise Sd4MatchError(f"at most {self.length - 2} rows fit between BOS and EOS, got {n}")
        ids = torch.zeros(1, self.length, dtype=torch.long)
        ids[0, 0], ids[0, n + 1] = self.bos, self.eos
        if fill is not None:
            ids[0, 1 : n + 1] = fill
        return ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding layer's output (token + position) of ``ids``: (B, L) -> (B, L, D) fp32."""
        with torch.no_grad():
            return self.embeddings(input_ids=ids.to(self.text_encoder.device)).float()

    def random_rows(self, count: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` x ``n`` rows: embedding-layer outputs of random vocabulary ids at positions
        1 ... n (the official initialisation of Single and Class prompts): (count, n, D)."""
        ids = torch.randint(0, self.vocab, (count, n), generator=generator)
        return torch.cat([self.embed_ids(self.template_ids(n, row))[:, 1 : n + 1] for row in ids])

    def end_rows(self, n: int) -> torch.Tensor:
        """The BOS row (position 0) and the EOS row (position n + 1) for n learned rows: (1, 2, D)."""
        rows = self.embed_ids(self.template_ids(n))
        return torch.stack([rows[:, 0], rows[:, n + 1]], dim=1)

    def encode_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) embedding-layer rows -> (B, 77, D) text-encoder output (transformer + final norm).

        Gradients flow into ``seq``; the encoder's weights stay frozen.
        """
        b, length, d = seq.shape
        if d != self.dim or length != self.length:
            raise Sd4MatchError(f"a prompt sequence must be (B, {self.length}, {self.dim}) for this text encoder, got {tuple(seq.shape)}")

        def swap(module, args, kwargs, out):
            return seq.to(device=out.device, dtype=out.dtype)

        ids = self.template_ids(0).expand(b, -1).to(self.text_encoder.device)  # only their shape reaches the transformer
        h = self.embeddings.register_forward_hook(swap, with_kwargs=True)
        try:
            return self.text_encoder(ids)[0]
        finally:
            h.remove()

    def encode_rows(self, rows: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
        """[BOS row, ``rows``, EOS row, padding rows] through the encoder.

        Args:
            rows: (B, n, D) learned rows (positions 1 ... n, no position embedding added).
            ends: (B or 1, 2, D) the BOS and EOS rows to use; default: this encoder's
                embedding-layer output of BOS at 0 and EOS at n + 1.

        Shape:
            returns (B, 77, D).
        """
        b, n, d = rows.shape
        if d != self.dim:
            raise Sd4MatchError(f"prompt rows are {d}-d but this text encoder is {self.dim}-d")
        template = self.embed_ids(self.template_ids(n)).to(rows.device)  # (1, 77, D)
        if ends is None:
            ends = torch.stack([template[:, 0], template[:, n + 1]], dim=1)
        ends = ends.to(rows.device, rows.dtype).expand(b, -1, -1)
        pad = template[:, n + 2 :].to(rows.dtype).expand(b, -1, -1)
        return self.encode_sequence(torch.cat([ends[:, :1], rows, ends[:, 1:], pad], dim=1))


class Prompt(nn.Module):
    """Base of all prompts.

    Call with a batch dict: ``{"categories": [B strings], "dino_src": (B, P, C),
    "dino_trg": (B, P, C)}`` (keys a prompt does not need may be absent) and get
    (B or 1, 77, D) prompt embeddings.
    """

    kind: str = ""

    def __init__(self, bridge: TextEncoderBridge, config: PromptConfig):
        super().__init__()
        self.bridge = bridge
        self.config = config

    @property
    def learnable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

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


def read_prompt_config(folder: str | Path) -> PromptConfig:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise Sd4MatchError(f"{folder}: not a prompt folder (config.json is missing)")
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = PromptConfig(**raw)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise Sd4MatchError(f"{cfg_path}: not a valid prompt config ({e})") from None
    if cfg.format != PROMPT_FORMAT and cfg.kind in ("single", "category", "cpm"):
        raise Sd4MatchError(f"{cfg_path}: prompt format {cfg.format!r} is from an older sd4match whose learned prompts are parameterised "
                            f"differently; it cannot be read as {PROMPT_FORMAT!r}: train it again (or import the official files)")
    return cfg


def read_prompt_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    path = Path(folder) / "prompt.safetensors"
    if not path.is_file():
        raise Sd4MatchError(f"{path}: prompt weights are missing")
    try:
        return load(path.read_bytes())
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read prompt weights (truncated or corrupt: {first_line(e)})") from None
