"""The frozen CLIP text encoder of a Stable Diffusion model, as prompts use it.

``TextEncoderBridge`` encodes text, and sequences of CLIP *embedding-layer outputs*
(token + position embedding): the 77 x D sequence goes straight into the loaded model's own
frozen CLIP transformer and final LayerNorm, with no position embedding added again, as the
official SD4Match code does. The model is not modified: a forward hook on the text model's
``embeddings`` module replaces that module's output with the sequence for the duration of
one call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sd4match.errors import Sd4MatchError


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
