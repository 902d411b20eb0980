"""Prompt folders on the Hugging Face hub: ``hf://owner/name[@revision][/subfolder]``.

``fetch_hub_prompt`` downloads (only) the prompt folder into huggingface_hub's own cache and
returns its local path; a cached copy is used without touching the network. Offline
(``HF_HUB_OFFLINE=1``) with nothing cached, or the hub unreachable: one line naming what is
missing and how to get it, in about a second. ``push_prompt`` uploads a prompt folder with a
model card (``model_card``) written from its ``config.json`` and, when given, a ``score.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from sd4match.errors import Sd4MatchError, first_line
from sd4match.features.adapters import ADAPTER_CONFIG, ADAPTER_FILE, describe_adapter, has_adapter, read_adapter
from sd4match.features.registry import offline_mode
from sd4match.prompts.base import describe_training, kind_summary, read_prompt_config, read_prompt_tensors

HUB_PREFIX = "hf://"
PROMPT_FILES = ("prompt.safetensors", "config.json")
ADAPTER_FILES = (ADAPTER_FILE, ADAPTER_CONFIG)  # present when the prompt was trained with an adapter (--adapt lora, finetune)


def is_hub_uri(text: str) -> bool:
    return str(text).startswith(HUB_PREFIX)


def parse_hub_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://owner/name[@revision][/sub/folder]`` -> (repo id, revision or None, subfolder or "")."""
    rest = uri[len(HUB_PREFIX):] if is_hub_uri(uri) else uri
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise Sd4MatchError(f"--prompt {uri}: expected hf://owner/name[@revision][/subfolder]")
    owner, name = parts[0], parts[1]
    name, _, revision = name.partition("@")
    if not owner or not name or any(p in (".", "..") for p in parts):
        raise Sd4MatchError(f"--prompt {uri}: expected hf://owner/name[@revision][/subfolder]")
    return f"{owner}/{name}", revision or None, "/".join(parts[2:])


def fetch_hub_prompt(uri: str, *, cache_dir: str | Path | None = None, local_files_only: bool | None = None) -> Path:
    """The local folder of the hub prompt ``uri``: from the cache, else downloaded into it.

    Raises:
        Sd4MatchError: not cached and offline, the hub unreachable, no such repository or
            revision, or no prompt folder at the subfolder.
    """
    from huggingface_hub import constants, snapshot_download

    repo, revision, sub = parse_hub_uri(uri)
    files = PROMPT_FILES + ADAPTER_FILES  # the adapter's when the repository has them
    patterns = [f"{sub}/{f}" for f in files] if sub else list(files)
    kw = {"revision": revision, "allow_patterns": patterns, "cache_dir": cache_dir}
    try:
        path = Path(snapshot_download(repo, local_files_only=True, **kw))
    except Exception:  # not cached (LocalEntryNotFoundError and its kin): try the hub unless offline
        if offline_mode(local_files_only):
            raise Sd4MatchError(f"{uri}: not in the local hub cache ({cache_dir or constants.HF_HUB_CACHE}) and offline (HF_HUB_OFFLINE): "
                                f"{_hint(repo, revision, sub)}") from None
        try:
            path = Path(snapshot_download(repo, etag_timeout=5, **kw))
        except Exception as e:  # network, auth, missing repo or revision: one line each
            raise Sd4MatchError(f"{uri}: cannot download ({type(e).__name__}: {first_line(e)}); {_hint(repo, revision, sub)}") from None
    folder = path / sub if sub else path
    if not (folder / "config.json").is_file():
        raise Sd4MatchError(f"{uri}: holds no prompt folder at {sub or 'its top level'} (config.json is missing)")
    return folder


def _hint(repo: str, revision: str | None, sub: str) -> str:
    rev = f" --revision {revision}" if revision else ""
    inc = f" --include '{sub}/*'" if sub else ""
    return (f"download it where the hub is reachable with `hf download {repo}{rev}{inc}` and copy the hub cache (HF_HOME) here, "
            f"or pass the prompt folder itself")


# ------------------------------------------------------------------------------ push
def model_card(folder: str | Path, repo_id: str, score: dict | None = None) -> str:
    """A model card (README.md) for a prompt folder: what it is, its model and settings, its
    training data and step, and the score's numbers when given."""
    cfg = read_prompt_config(folder)
    what = kind_summary(cfg.kind, markdown=True)
    tensors = read_prompt_tensors(folder)
    n_values = sum(t.numel() for t in tensors.values())
    base = cfg.model.split("@")[0] if cfg.model and "/" in cfg.model and not cfg.model.startswith(("/", ".")) else None
    front = ["---", "library_name: sd4match", "tags:", "- semantic-correspondence", "- stable-diffusion", "- sd4match", "- prompt-tuning"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    lines = front + ["", f"# {repo_id.split('/')[-1]}: an sd4match {cfg.kind} prompt", "",
                     "A learned prompt for dense semantic correspondence with Stable Diffusion features "
                     "([sd4match](https://pypi.org/project/sd4match/), after SD4Match, Li et al., arXiv 2310.17569).", "",
                     f"- **What it is**: `{cfg.kind}`: {what}",
                     f"- **Model**: `{cfg.model or 'not recorded'}` ({cfg.text_dim}-d text encoder)",
                     f"- **Feature settings**: timestep {cfg.timestep if cfg.timestep is not None else 'not recorded'}, "
                     f"`unet.up_blocks[{cfg.up_block if cfg.up_block is not None else '?'}]`",
                     f"- **Size**: {n_values:,} values ({', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(tensors.items()))})"]
    if cfg.categories:
        lines.append(f"- **Categories** ({len(cfg.categories)}): {', '.join(cfg.categories)}")
    if cfg.n_cond is not None:
        lines.append(f"- **CPM**: {cfg.n_global} global + {cfg.n_cond} conditional rows from DINOv2 `{cfg.dino_model}` tokens")
    adapter = describe_adapter(folder)
    if adapter:
        lines.append(f"- **Adapter**: {adapter} (`adapter.safetensors`, applied to the UNet by sd4match per call)")
    lines.append(f"- **{'Origin' if cfg.training.get('imported_from') else 'Training'}**: {describe_training(cfg.training)}")
    lines += ["", "## Use", "", "```bash", "pip install sd4match",
              f"sd4match match a.jpg b.jpg --prompt hf://{repo_id} --model {cfg.model.split('@')[0] if base else 'sd-2-1'} --out matches",
              f"sd4match evaluate --prompt hf://{repo_id} --dataset spair --root SPair-71k --split test --out runs/eval", "```"]
    if score:
        lines += ["", "## Score", "", f"Dataset {score.get('dataset', '?')}/{score.get('split', '?')}, protocol `{score.get('protocol')}`, "
                  f"{score.get('n_pairs')} pairs, {score.get('n_points')} points (PCK in %):", "",
                  "| aggregation | " + " | ".join(f"PCK@{a}" for a in score["per_image"]["all"]) + " |",
                  "|---|" + "---|" * len(score["per_image"]["all"])]
        for agg in ("per_image", "per_point"):
            lines.append(f"| {agg.replace('_', ' ')} | " + " | ".join(f"{100 * v:.2f}" for v in score[agg]["all"].values()) + " |")
        run = score.get("run", {}).get("config", {})
        if run:
            lines += ["", f"Match rule `{run.get('rule')}`, seed {run.get('seed')}, timestep {run.get('settings', {}).get('timestep')}."]
    return "\n".join(lines) + "\n"


def push_prompt(folder: str | Path, repo_id: str, *, score: str | Path | None = None, private: bool = False, token: str | None = None,
                revision: str | None = None, api=None) -> str:
    """Upload a prompt folder (its two files and a model card) to the hub repository
    ``repo_id`` (created when missing); return the commit's address."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    read_prompt_tensors(folder)  # a damaged folder is named before anything is sent
    files = PROMPT_FILES
    if has_adapter(folder):
        read_adapter(folder)  # ... its adapter too
        files += ADAPTER_FILES
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise Sd4MatchError(f"{repo_id}: expected a repository id owner/name")
    doc = None
    if score is not None:
        if Path(score).is_dir():  # an evaluation's folder: its score.json
            score = Path(score) / "score.json"
        try:
            doc = json.loads(Path(score).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise Sd4MatchError(f"--score {score}: unreadable ({first_line(e)})") from None
        if not isinstance(doc, dict) or "per_image" not in doc:
            raise Sd4MatchError(f"--score {score}: not a score.json of sd4match evaluate or score")
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sd4match-push-") as tmp:
        stage = Path(tmp)
        for f in files:
            shutil.copy2(folder / f, stage / f)
        (stage / "README.md").write_text(model_card(folder, repo_id, doc), encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=stage, revision=revision, commit_message="Upload sd4match prompt")
        except Exception as e:  # auth, network, permissions: one line
            raise Sd4MatchError(f"cannot push {folder} to {repo_id} ({type(e).__name__}: {first_line(e)})") from None
    return str(getattr(info, "commit_url", info))
