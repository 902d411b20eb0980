"""What every prompt shares: the batch it reads, the frozen text encoder, save and load.

A prompt turns a batch into ``encoder_hidden_states`` for the UNet: (B or 1, 77, D).
Learned prompts hold token embeddings that sit between BOS and EOS and go through the
loaded model's own frozen CLIP text encoder (its positional embeddings, attention and
final norm): a forward hook on the encoder's token-embedding layer swaps the looked-up
embeddings of 75 placeholder tokens for the learned ones, so the unmodified
``CLIPTextModel.forward`` runs.

Saved as a folder: ``prompt.safetensors`` (the learned tensors) + ``config.json``.
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
N_TOKENS = 75  # learnable tokens between BOS and EOS in CLIP's 77


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
    training: dict[str, Any] = field(default_factory=dict)  # data, split, step, ...
    format: str = "sd4match-prompt-1"

    def __post_init__(self):
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r}; expected one of {', '.join(PROMPT_KINDS)}")


class TextEncoderBridge:
    """Runs the frozen CLIP text encoder on learned token embeddings (not a submodule:
    its weights are not the prompt's and are never saved with it)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.dim = int(text_encoder.get_input_embeddings().weight.shape[1])
        self.length = int(tokenizer.model_max_length)
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, D) learned embeddings -> (B, 77, D) text-encoder output, BOS + tokens + EOS (+ padding).

        Gradients flow into ``tokens``; the encoder's weights stay frozen.
        """
        b, n, d = tokens.shape
        if d != self.dim:
            raise Sd4MatchError(f"prompt tokens are {d}-d but this text encoder is {self.dim}-d")
        if n > self.length - 2:
            raise Sd4MatchError(f"at most {self.length - 2} tokens fit between BOS and EOS, got {n}")
        ids = torch.full((b, self.length), self.eos, dtype=torch.long, device=tokens.device)
        ids[:, 0] = self.bos
        emb_layer = self.text_encoder.get_input_embeddings()

        def swap(module, args, out):
            return torch.cat([out[:, :1], tokens.to(out.dtype), out[:, 1 + n :]], dim=1)

        h = emb_layer.register_forward_hook(swap)
        try:
            return self.text_encoder(ids)[0]
        finally:
            h.remove()

    def random_vocab_embeddings(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Embeddings of vocabulary tokens drawn at random: the paper's initialisation."""
        weight = self.text_encoder.get_input_embeddings().weight
        idx = torch.randint(0, weight.shape[0], tuple(shape), generator=generator)
        return weight.detach()[idx.to(weight.device)].clone().float()


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
        return PromptConfig(**raw)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise Sd4MatchError(f"{cfg_path}: not a valid prompt config ({e})") from None


def read_prompt_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    path = Path(folder) / "prompt.safetensors"
    if not path.is_file():
        raise Sd4MatchError(f"{path}: prompt weights are missing")
    try:
        return load(path.read_bytes())
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read prompt weights (truncated or corrupt: {first_line(e)})") from None
