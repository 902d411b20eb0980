"""Adapting the UNet itself, beside (or instead of) the prompt: LoRA adapters and fine-tuning.

An ``Adapter`` holds its own tensors and never modifies the UNet: the featurizer calls the
UNet through ``torch.func.functional_call`` with the adapted weights put in place for that
call only (``overrides``), so a UNet shared by two featurizers, one adapted and one not,
gives each its own features, and after a call the UNet is exactly as it was.

- ``lora`` (Hu et al. 2021): for each targeted ``nn.Linear`` of the blocks the early exit
  runs (``down_blocks``, ``mid_block``, ``up_blocks[: k + 1]``), W' = W + (alpha / r) B A,
  A (r x in) initialised as PEFT does (Kaiming-uniform, a = sqrt(5)), B (out x r) zeros: at
  initialisation the features equal the base model's, bit for bit. Targets are module-name
  suffixes (default: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``).
- ``finetune``: trainable copies of every weight of the chosen blocks (``blocks``, e.g.
  ``up_blocks.1,up_blocks.0``; default: every block the early exit runs).

Saved as ``adapter.safetensors`` (tensors, PEFT-style names ``<module>.lora_A.weight``)
and ``adapter.json`` (its settings) in a prompt folder, next to the prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from sd4match.errors import Sd4MatchError, first_line
from sd4match.fileio import atomic_path, atomic_write_text

ADAPTER_KINDS = ("lora", "finetune")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"


@dataclass
class AdapterConfig:
    """What an adapter is (``adapter.json``)."""

    kind: str  # lora | finetune
    up_block: int  # the feature block: only blocks up to it are adapted
    rank: int = 4
    alpha: float = 4.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    blocks: list[str] = field(default_factory=list)  # finetune: block prefixes (empty: every block the early exit runs)
    seed: int = 0
    model: str = ""
    format: str = "sd4match-adapter-1"


def early_exit_blocks(unet, up_block: int) -> list[str]:
    """Module-name prefixes of the blocks the early exit to ``up_blocks[up_block]`` runs."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(up_block + 1)]


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Adapter(nn.Module):
    """LoRA or fine-tuning tensors for one UNet; ``overrides(unet)`` gives the adapted weights."""

    def __init__(self, unet, config: AdapterConfig):
        super().__init__()
        if config.kind not in ADAPTER_KINDS:
            raise Sd4MatchError(f"adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got {config.kind!r}")
        self.config = config
        runs = early_exit_blocks(unet, config.up_block)
        self.names: list[str] = []  # the UNet parameter each tensor adapts
        if config.kind == "lora":
            if config.rank < 1:
                raise Sd4MatchError(f"--lora-rank must be at least 1, got {config.rank}")
            g = torch.Generator().manual_seed(config.seed)
            self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
            for name, mod in unet.named_modules():
                if isinstance(mod, nn.Linear) and _under(name, runs) and any(name == t or name.endswith("." + t) for t in config.targets):
                    a = torch.empty(config.rank, mod.in_features)
                    bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises lora_A
                    a.uniform_(-bound, bound, generator=g)
                    self.lora_A.append(nn.Parameter(a))
                    self.lora_B.append(nn.Parameter(torch.zeros(mod.out_features, config.rank)))
                    self.names.append(f"{name}.weight")
            if not self.names:
                raise Sd4MatchError(f"--lora-targets {','.join(config.targets)}: no linear layer of the blocks up to up_blocks[{config.up_block}] "
                                    f"ends with those names")
        else:
            blocks = config.blocks or runs
            bad = [b for b in blocks if b not in runs and not any(b.startswith(r + ".") for r in runs)]
            if bad:
                raise Sd4MatchError(f"--finetune-blocks {', '.join(bad)}: not among the blocks the early exit runs ({', '.join(runs)})")
            self.weights = nn.ParameterList()
            for name, p in unet.named_parameters():
                if _under(name, blocks):
                    self.weights.append(nn.Parameter(p.detach().clone().float()))
                    self.names.append(name)
        self.scale = config.alpha / config.rank

    def overrides(self, unet) -> dict[str, torch.Tensor]:
        """{UNet parameter name: the adapted tensor} for ``torch.func.functional_call``."""
        params = dict(unet.named_parameters())
        if self.config.kind == "lora":
            out = {}
            for name, a, b in zip(self.names, self.lora_A, self.lora_B):
                w = params[name]
                out[name] = w + (self.scale * (b @ a)).to(w.dtype)
            return out
        return {name: w.to(params[name].dtype) for name, w in zip(self.names, self.weights)}

    def fingerprint(self) -> str:
        """A name for the adapter's content (store keys)."""
        import hashlib

        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for v in self.state_dict().values():
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return f"{self.config.kind}:{h.hexdigest()[:24]}"

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.config.kind == "lora":
            tensors = {}
            for name, a, b in zip(self.names, self.lora_A, self.lora_B):
                base = name[: -len(".weight")]
                tensors[f"{base}.lora_A.weight"], tensors[f"{base}.lora_B.weight"] = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        else:
            tensors = {name: w.detach().cpu().contiguous() for name, w in zip(self.names, self.weights)}
        with atomic_path(folder / ADAPTER_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"kind": self.config.kind})
        atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(asdict(self.config), indent=2))
        return folder


def has_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter(folder: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter files of ``folder`` as they are (no UNet needed); one-line errors for a
    missing or corrupt file."""
    from safetensors.torch import load

    folder = Path(folder)
    try:
        cfg = AdapterConfig(**json.loads((folder / ADAPTER_CONFIG).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise Sd4MatchError(f"{folder / ADAPTER_CONFIG}: not a readable adapter config ({first_line(e)})") from None
    try:
        tensors = load((folder / ADAPTER_FILE).read_bytes())
    except Exception as e:
        raise Sd4MatchError(f"{folder / ADAPTER_FILE}: cannot read adapter weights (truncated or corrupt: {first_line(e)})") from None
    return cfg, tensors


def describe_adapter(folder: str | Path) -> str | None:
    """One line on the adapter a prompt folder carries (None without one)."""
    if not has_adapter(folder):
        return None
    cfg, tensors = read_adapter(folder)
    n = sum(t.numel() for t in tensors.values())
    what = (f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g}, on {', '.join(cfg.targets)}" if cfg.kind == "lora"
            else f"fine-tuned weights of {', '.join(cfg.blocks) or 'every block the early exit runs'}")
    return f"{cfg.kind} adapter ({what}; blocks up to up_blocks[{cfg.up_block}]): {n:,} values in {len(tensors)} tensors"


def load_adapter(folder: str | Path, unet) -> Adapter:
    """The adapter saved in ``folder`` for ``unet``, bit-exact; one-line errors for a
    missing, corrupt or mismatched file."""
    folder = Path(folder)
    cfg, tensors = read_adapter(folder)
    ad = Adapter(unet, cfg)
    with torch.no_grad():
        try:
            if cfg.kind == "lora":
                for name, a, b in zip(ad.names, ad.lora_A, ad.lora_B):
                    base = name[: -len(".weight")]
                    a.copy_(tensors.pop(f"{base}.lora_A.weight"))
                    b.copy_(tensors.pop(f"{base}.lora_B.weight"))
            else:
                for name, w in zip(ad.names, ad.weights):
                    w.copy_(tensors.pop(name))
        except (KeyError, RuntimeError) as e:
            raise Sd4MatchError(f"{folder / ADAPTER_FILE}: does not fit this UNet ({first_line(e)})") from None
    if tensors:
        raise Sd4MatchError(f"{folder / ADAPTER_FILE}: holds tensors this UNet has no place for ({', '.join(sorted(tensors)[:3])}, ...)")
    return ad
