"""The authors' released prompts (``pretrained_prompts.zip`` of ActiveVisionLab/SD4Match) as
prompt folders.

- Single / Class: ``caption.pt``, a dict of (1, 77, D) tensors, each the full
  embedding-layer sequence [BOS, 75 learned rows, EOS] the official code feeds to CLIP's
  transformer: ``{"dataset": t}`` for Single, ``{category: t}`` for Class.
- HiddenState (``--learn_hidden_state``): ``caption.pt`` of the same layout, but each
  (1, 77, D) tensor holds CLIP *outputs*, used as ``encoder_hidden_states`` directly.
  Official folder names say ``HiddenState`` where token prompts say ``TokenEmbeds75``.
- CPM: ``ckpt.pt``, the state dict ``{global_embeds, positional_embedding, alpha_cond,
  linear_C.weight, linear_C.bias, linear_N.weight, linear_N.bias}``; ``global_embeds`` is
  absent when the global length is 0 (``...-G0-C50``); the lengths are read from the shapes.
  The official Head and Img modes (one ``linear`` layer) become ``cpm`` with
  ``cpm_input="cls"`` (Pair-Head) or ``cpm-image`` (Img-Feat, Img-Head); the mode comes
  from the folder name (``CPM_<data>_sd2-1_<Pair|Img>-DINO-<Feat|Head>-G<n>-C<n>``) or
  ``cpm_config``. CLIP-conditioned CPMs are refused by name.

A Single/Class file is told from a HiddenState one by its first row: an embedding-layer
sequence starts with the text encoder's own BOS row (token + position embedding, fixed,
never learned); CLIP outputs (and U[0, 1) initialised HiddenState rows) do not. A folder
named ``...HiddenState...`` given as single/category is refused too.

Files are read with ``torch.load(weights_only=True)`` only; every shape is checked
against the text encoder (and the DINOv2 width for CPM) before anything is written.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import NamedTuple

import torch

from sd4match.config import ImportKind
from sd4match.errors import Sd4MatchError, torch_load_problem
from sd4match.features.adapters import describe_adapter
from sd4match.fileio import file_sha256
from sd4match.prompts.base import PROMPT_CLASSES, describe_training, kind_summary, read_prompt_config, read_prompt_tensors
from sd4match.prompts.build import bridge_for, make_prompt

CPM_KEYS = ("global_embeds", "positional_embedding", "alpha_cond", "linear_C.weight", "linear_C.bias", "linear_N.weight", "linear_N.bias")
#: how far the first row of an embedding-layer file may be from the BOS row (fp16 round trips)
BOS_TOLERANCE = 1e-2
IMPORT_KINDS: tuple[str, ...] = typing.get_args(ImportKind)


#: ``<Single|Class|CPM>_<train data>_sd<version>_<what>``, as train_simple_prompt.py:60-65 and train_cpm.py name their folders
OFFICIAL_NAME = re.compile(r"^(?P<method>Single|Class|CPM)_(?P<train>spair|pfpascal|pfwillow)_sd(?P<sd>[0-9]+-[0-9]+)_(?P<what>[A-Za-z0-9-]+)$")


class OfficialName(NamedTuple):
    """What an official prompt folder's name says."""

    method: str  # Single | Class | CPM
    train: str  # the dataset it was trained on
    kind: str  # the import kind: single | category | hidden | cpm
    hidden: bool  # a HiddenState prompt (CLIP outputs)


def parse_official_name(name: str) -> OfficialName | None:
    """What an official prompt folder name says, or None for another name.

    ``Single_spair_sd2-1_TokenEmbeds75`` -> (Single, spair, single); ``Class_..._HiddenState``
    -> (Class, ..., hidden); ``CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50`` -> (CPM, spair, cpm).
    """
    m = OFFICIAL_NAME.match(name)
    if m is None:
        return None
    method, what = m["method"], m["what"]
    if method == "CPM":
        return OfficialName(method, m["train"], "cpm", False)
    if what == "HiddenState":
        return OfficialName(method, m["train"], "hidden", True)
    if what.startswith("TokenEmbeds"):
        return OfficialName(method, m["train"], "single" if method == "Single" else "category", False)
    return None


def official_file(kind: str) -> str:
    """The file an official prompt folder of import ``kind`` holds."""
    return "ckpt.pt" if kind == "cpm" else "caption.pt"


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """A released file as a dict of tensors; one-line errors for missing, truncated or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise Sd4MatchError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, not a torch file: all unreadable here
        raise Sd4MatchError(f"{path}: cannot read as a released prompt file ({torch_load_problem(e)})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise Sd4MatchError(f"{path}: not a dict of named tensors (what the official code saves)")
    return data


def _keys(data: dict, most: int = 10) -> str:
    """A file's keys for a message: quoted, at most ``most`` of them."""
    keys = sorted(data)
    return ", ".join(map(repr, keys[:most])) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _sequence(path: Path, name: str, t: torch.Tensor, bridge) -> torch.Tensor:
    t = t if t.ndim == 3 else t[None]
    if t.shape != (1, bridge.length, bridge.dim):
        raise Sd4MatchError(f"{path}: prompt {name!r} is {tuple(t.shape)}, but this text encoder takes (1, {bridge.length}, {bridge.dim})")
    if not torch.isfinite(t).all():
        raise Sd4MatchError(f"{path}: prompt {name!r} holds non-finite values")
    return t.float()


def starts_with_bos(seq: torch.Tensor, bridge) -> bool:
    """Whether a (1, 77, D) sequence begins with this text encoder's BOS embedding-layer row
    (a Single/Class file does; a HiddenState file of CLIP outputs does not)."""
    bos = bridge.end_rows(bridge.length - 2)[0, 0].float()
    return bool((seq[0, 0].float() - bos).abs().max() <= BOS_TOLERANCE * max(1.0, float(bos.abs().max())))


def _check_token_file(path: Path, seqs: dict[str, torch.Tensor], bridge) -> None:
    if "HiddenState" in str(path.parent.name) or "HiddenState" in path.name:
        raise Sd4MatchError(f"{path}: a HiddenState prompt (its folder says so) holds CLIP outputs, not embedding-layer rows: use --kind hidden")
    bad = [name for name, t in seqs.items() if not starts_with_bos(t, bridge)]
    if bad:
        raise Sd4MatchError(f"{path}: prompt {bad[0]!r} does not start with this text encoder's BOS embedding row: it holds CLIP outputs "
                            f"(a HiddenState file: use --kind hidden) or was made for another text encoder")


def import_official(path: str | Path, kind: str, featurizer, out: str | Path, *, dino: str | None = "dinov2-b", dino_dim: int | None = None,
                    cpm_config: str | None = None) -> Path:
    """Turn a released official prompt file into a prompt folder at ``out``; return ``out``.

    Args:
        path: ``caption.pt`` (single, category, hidden) or ``ckpt.pt`` (cpm).
        kind: ``single``, ``category``, ``cpm`` or ``hidden`` (Single or Class HiddenState,
            told apart by the file's keys).
        featurizer: the ``SDFeaturizer`` the prompt is for (its text encoder's width and rows).
        dino: the DINOv2 the CPM takes its tokens from (recorded in the folder).
        dino_dim: that DINOv2's token width, when known (the file must fit it).
        cpm_config: the official captioner config, ``<Pair|Img>-DINO-<Feat|Head>-G<n>-C<n>``
            (default: read from the file's folder name when it is an official one, else
            told from the file's keys where they tell: Pair-Feat has linear_C and linear_N,
            Pair-Head a ``linear`` layer twice the DINOv2 width wide).

    ``load_prompt(out, featurizer)`` then gives the official code's embeddings.
    """
    if kind not in IMPORT_KINDS:
        raise Sd4MatchError(f"--kind {kind}: expected one of {', '.join(IMPORT_KINDS)}")
    path = Path(path)
    data = read_official(path)
    bridge = bridge_for(featurizer)
    n = bridge.length - 2
    if kind == "single":
        if "dataset" not in data:
            hint = "a CPM checkpoint? use --kind cpm" if set(data) & set(CPM_KEYS) else "a Class file? use --kind category"
            raise Sd4MatchError(f"{path}: a Single prompt file holds the key 'dataset'; this one holds {_keys(data)} ({hint})")
        seq = _sequence(path, "dataset", data["dataset"], bridge)
        _check_token_file(path, {"dataset": seq}, bridge)
        prompt = make_prompt("single", featurizer, n_tokens=n)
        state = {"tokens": seq[:, 1 : n + 1], "ends": seq[:, [0, n + 1]]}
    elif kind == "category":
        if set(data) & set(CPM_KEYS):
            raise Sd4MatchError(f"{path}: this is a CPM checkpoint, not a Class prompt file (use --kind cpm)")
        cats = sorted(data)
        per = {c: _sequence(path, c, data[c], bridge) for c in cats}
        _check_token_file(path, per, bridge)
        seqs = torch.cat([per[c] for c in cats])
        prompt = make_prompt("category", featurizer, categories=cats, n_tokens=n)
        state = {"tokens": seqs[:, 1 : n + 1], "ends": seqs[:, [0, n + 1]]}
    elif kind == "hidden":
        if set(data) & set(CPM_KEYS):
            raise Sd4MatchError(f"{path}: this is a CPM checkpoint, not a HiddenState prompt file (use --kind cpm)")
        per = {c: _sequence(path, c, data[c], bridge) for c in sorted(data)}
        if all(starts_with_bos(t, bridge) for t in per.values()):
            raise Sd4MatchError(f"{path}: its rows start with the BOS embedding row: embedding-layer rows (TokenEmbeds), not CLIP outputs: "
                                f"use --kind {'single' if 'dataset' in per else 'category'}")
        if "dataset" in per:
            if len(per) > 1:
                raise Sd4MatchError(f"{path}: holds 'dataset' and {len(per) - 1} other prompts; a Single file holds 'dataset' alone")
            prompt = make_prompt("hidden", featurizer)
            state = {"states": per["dataset"]}
        else:
            prompt = make_prompt("hidden-category", featurizer, categories=list(per))
            state = {"states": torch.cat([per[c] for c in prompt.config.categories])}
    else:
        prompt, state = _cpm_from_file(path, data, featurizer, bridge, dino=dino, dino_dim=dino_dim, cpm_config=cpm_config)
    try:
        prompt.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise Sd4MatchError(f"{path}: does not fit a {kind} prompt ({str(e).splitlines()[-1].strip()})") from None
    prompt.config.model = featurizer.model_id
    prompt.config.training = {"imported_from": {"file": path.name, "sha256": file_sha256(path), "kind": kind,
                                                "source": "ActiveVisionLab/SD4Match pretrained_prompts.zip format"}}
    return prompt.save(out)


#: ``<Pair|Img>-<DINO|CLIP>-<Feat|Head>-G<n>-C<n>``: the official ``--captioner_config``
CPM_CONFIG = re.compile(r"^(?P<mode>Pair|Img)-(?P<extractor>DINO|CLIP)-(?P<type>Feat|Head)-G(?P<g>[0-9]+)-C(?P<c>[0-9]+)$")


def _cpm_from_file(path: Path, data: dict, featurizer, bridge, *, dino, dino_dim, cpm_config):
    """The CPM prompt (``cpm`` or ``cpm-image``) a released ``ckpt.pt`` is, and its state."""
    if cpm_config is None:
        m = OFFICIAL_NAME.match(path.parent.name)
        cpm_config = m["what"] if m is not None and CPM_CONFIG.match(m["what"]) else None
    d = bridge.dim
    if cpm_config is not None:
        c = CPM_CONFIG.match(cpm_config)
        if c is None:
            raise Sd4MatchError(f"--cpm-config {cpm_config}: expected <Pair|Img>-DINO-<Feat|Head>-G<n>-C<n> (e.g. Pair-DINO-Feat-G25-C50)")
        if c["extractor"] != "DINO":
            raise Sd4MatchError(f"{path}: a CPM on CLIP image features ({cpm_config}): this release conditions on DINOv2 only")
        mode, ftype = c["mode"], c["type"]
    elif "linear_C.weight" in data:
        mode, ftype = "Pair", "Feat"
    elif "linear.weight" in data and dino_dim is not None and data["linear.weight"].ndim == 2 and data["linear.weight"].shape[1] == 2 * dino_dim:
        mode, ftype = "Pair", "Head"
    elif "linear.weight" in data:
        raise Sd4MatchError(f"{path}: a CPM with one 'linear' layer is an official Img-Feat, Img-Head or Pair-Head file, which its keys "
                            f"cannot tell apart: name it with --cpm-config (e.g. Img-DINO-Feat-G25-C50), or keep the official folder name")
    else:
        mode, ftype = "Pair", "Feat"
    lin = ("linear_C", "linear_N") if (mode, ftype) == ("Pair", "Feat") else ("linear",)
    keys = ["positional_embedding", "alpha_cond"] + [f"{n}.{w}" for n in lin for w in ("weight", "bias")]
    missing = [k for k in keys if k not in data]
    extra = sorted(set(data) - set(keys) - {"global_embeds"})
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"holds unexpected {', '.join(extra)}"
        raise Sd4MatchError(f"{path}: not a {mode}-DINO-{ftype} CPM checkpoint: it {what}")
    pe, ac = data["positional_embedding"], data["alpha_cond"]
    ge = data.get("global_embeds", torch.zeros(1, 0, d))  # G0: no global rows
    if ge.ndim != 3 or ge.shape[0] != 1 or ge.shape[2] != d:
        raise Sd4MatchError(f"{path}: global_embeds is {tuple(ge.shape)}, expected (1, G, {d}) for this text encoder")
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d or ac.shape != pe.shape:
        raise Sd4MatchError(f"{path}: positional_embedding {tuple(pe.shape)} and alpha_cond {tuple(ac.shape)} must both be (1, C, {d})")
    first = data[f"{lin[0]}.weight"]
    pictures = 2 if mode == "Pair" else 1
    if first.ndim != 2 or first.shape[0] != d or first.shape[1] % pictures or data[f"{lin[0]}.bias"].shape != (d,):
        raise Sd4MatchError(f"{path}: {lin[0]} is {tuple(first.shape)}, expected ({d}, {pictures} x DINOv2 width)")
    n_patches = 256
    if "linear_N.weight" in data:
        wn = data["linear_N.weight"]
        if wn.ndim != 2 or wn.shape[0] != wn.shape[1] or data["linear_N.bias"].shape != (wn.shape[0],):
            raise Sd4MatchError(f"{path}: linear_N is {tuple(wn.shape)}, expected (P, P) with P DINOv2 patches")
        n_patches = wn.shape[0]
    want, width, n_global, n_cond = dino_dim, first.shape[1] // pictures, ge.shape[1], pe.shape[1]
    if want is not None and want != width:
        raise Sd4MatchError(f"{path}: made for {width}-d DINOv2 tokens, but {dino} gives {want}-d ones")
    if n_global + n_cond > bridge.length - 2:
        raise Sd4MatchError(f"{path}: {n_global} global + {n_cond} conditional rows do not fit CLIP's {bridge.length - 2} learnable positions")
    if cpm_config is not None and (int(c["g"]), int(c["c"])) != (n_global, n_cond):
        raise Sd4MatchError(f"{path}: {cpm_config} says G{c['g']}-C{c['c']}, but the file holds {n_global} global and {n_cond} conditional rows")
    kind = "cpm" if mode == "Pair" else "cpm-image"
    prompt = make_prompt(kind, featurizer, dino_dim=width, n_patches=n_patches, n_global=n_global, n_cond=n_cond, dino_model=dino,
                         cpm_input="patches" if ftype == "Feat" else "cls")
    return prompt, {k: v.float() for k, v in data.items()}


def describe_prompt(folder: str | Path) -> str:
    """What a prompt folder holds, as a few lines of text (``sd4match prompts show``)."""
    cfg = read_prompt_config(folder)
    lines = [f"{folder}: {cfg.kind} prompt ({cfg.format}) for a {cfg.text_dim}-d text encoder, model {cfg.model or '(not recorded)'}",
             f"  what it is: {kind_summary(cfg.kind)}"]
    if cfg.template:
        lines.append(f"  template: {cfg.template!r}")
    if cfg.categories:
        lines.append(f"  categories ({len(cfg.categories)}): {', '.join(cfg.categories)}")
    if PROMPT_CLASSES[cfg.kind].needs_dino:
        lines.append(f"  CPM: {cfg.n_global} global + {cfg.n_cond} conditional rows from DINOv2 {cfg.dino_model or '?'} "
                     f"{cfg.cpm_input or 'patches'} tokens ({cfg.dino_dim}-d, {cfg.n_patches} patches)")
    if cfg.timestep is not None or cfg.up_block is not None:
        lines.append(f"  trained at timestep {cfg.timestep}, up_blocks[{cfg.up_block}]")
    if cfg.training:
        lines.append(f"  training: {describe_training(cfg.training)}")
    if (Path(folder) / "prompt.safetensors").is_file():
        tensors = read_prompt_tensors(folder)
        total = sum(t.numel() for t in tensors.values())
        lines.append(f"  tensors ({total:,} values): " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items())) if tensors else "  tensors: none")
    adapter = describe_adapter(folder)
    if adapter:
        lines.append(f"  {adapter}")
    return "\n".join(lines)
