"""Prompts on the Hugging Face hub: ``hf://`` from a pre-populated hub cache in offline mode
(no network), a clear offline error, and ``prompts push`` against a stub of the upload call."""

import json
from pathlib import Path

import pytest
import torch

from sd4match.cli import main
from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer
from sd4match.prompts import load_prompt, make_prompt, parse_prompt
from sd4match.prompts.hub import fetch_hub_prompt, model_card, parse_hub_uri
from sd4match.testing import tiny_sd

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def feat(tmp_path_factory):
    return SDFeaturizer.from_pretrained(tiny_sd(tmp_path_factory.mktemp("m") / "sd2"), resolution=64, ensemble=1)


def hub_cache(root, repo, feat, sub="", *, ref="main"):
    """The hub cache layout huggingface_hub reads: models--owner--name/{refs/<ref>, snapshots/<commit>/...}."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(COMMIT)
    prompt = make_prompt("single", feat, seed=5)
    prompt.config.training = {"dataset": "spair", "split": "trn", "step": 120}
    prompt.save(base / "snapshots" / COMMIT / sub if sub else base / "snapshots" / COMMIT)
    return prompt


def test_uri_grammar():
    assert parse_hub_uri("hf://me/prompts") == ("me/prompts", None, "")
    assert parse_hub_uri("hf://me/prompts@v1/cpm/spair") == ("me/prompts", "v1", "cpm/spair")
    for bad in ("hf://me", "hf://me/../x", "hf:///x"):
        with pytest.raises(Sd4MatchError, match="expected hf://owner/name"):
            parse_hub_uri(bad)


def test_hub_prompt_from_the_cache_offline(feat, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    saved = hub_cache(tmp_path / "hub", "me/prompts", feat, "single/spair")
    spec = parse_prompt("hf://me/prompts/single/spair")
    assert spec.kind == "single" and spec.folder.parts[-2:] == ("single", "spair")
    p = load_prompt(spec.folder, feat)
    assert torch.equal(p.tokens, saved.tokens)
    assert parse_prompt(f"hf://me/prompts@{COMMIT}/single/spair").folder == spec.folder  # a commit as revision
    assert main(["prompts", "show", "hf://me/prompts/single/spair"]) == 0
    assert "single prompt" in capsys.readouterr().out
    # what is not cached: one line, naming it and how to get it, without the network
    with pytest.raises(Sd4MatchError, match=r"hf://me/other: not in the local hub cache .* offline .*hf download me/other"):
        fetch_hub_prompt("hf://me/other")
    with pytest.raises(Sd4MatchError, match="holds no prompt folder at cpm"):
        fetch_hub_prompt("hf://me/prompts/cpm")
    ex = Path(__file__).resolve().parents[1] / "examples"
    assert main(["match", str(ex / "cat.jpg"), str(ex / "pets.jpg"), "--prompt", "hf://me/missing", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "hf://me/missing: not in the local hub cache" in err and "\n" not in err


def test_push_writes_a_model_card_and_uploads(feat, tmp_path, monkeypatch, capsys):
    prompt = make_prompt("single", feat, seed=1)
    prompt.config.model, prompt.config.timestep, prompt.config.up_block = "stabilityai/stable-diffusion-2-1@abc", 261, 1
    folder = prompt.save(tmp_path / "p", dataset="spair", split="trn", step=29600, adapt="prompt",  # as the trainer records it
                         cost={"adapt": "prompt", "trainable_params": 76800, "seconds_per_step": 0.19, "peak_memory_mb": 23456.7}, val_pck=0.7142)
    score = {"dataset": "spair", "split": "test", "protocol": "sd4match", "n_pairs": 12234, "n_points": 88328,
             "per_image": {"all": {"0.05": 0.595, "0.1": 0.755}}, "per_point": {"all": {"0.05": 0.55, "0.1": 0.7}},
             "run": {"config": {"rule": "kernel-softargmax", "seed": 0, "settings": {"timestep": 50}}}}
    (tmp_path / "score.json").write_text(json.dumps(score))
    sent = {}

    class StubApi:
        def __init__(self, token=None):
            sent["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            sent["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None):
            sent["files"] = {p.name: p.read_bytes() for p in folder_path.iterdir()}

            class Info:
                commit_url = f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

            return Info()

    monkeypatch.setattr("huggingface_hub.HfApi", StubApi)
    assert main(["prompts", "push", str(folder), "me/my-prompt", "--score", str(tmp_path / "score.json"), "--private", "--token", "t0k"]) == 0
    assert "use it with --prompt hf://me/my-prompt" in capsys.readouterr().out
    assert sent["repo"] == ("me/my-prompt", True, True) and sent["token"] == "t0k"
    assert set(sent["files"]) == {"prompt.safetensors", "config.json", "README.md"}
    assert sent["files"]["prompt.safetensors"] == (folder / "prompt.safetensors").read_bytes()
    card = sent["files"]["README.md"].decode()
    assert "base_model: stabilityai/stable-diffusion-2-1" in card and "timestep 261" in card
    # before: only "dataset spair, split trn, step 29600" (the keys it looked for were not those the trainer writes)
    training = "spair/trn, step 29,600; validation PCK@0.1 71.42 %; 76,800 trainable parameters (prompt), 0.19 s/step, peak 23,457 MB"
    assert f"- **Training**: {training}\n" in card
    capsys.readouterr()
    assert main(["prompts", "show", str(folder)]) == 0
    assert f"  training: {training}\n" in capsys.readouterr().out
    assert "| per image | 59.50 | 75.50 |" in card and "| per point | 55.00 | 70.00 |" in card and "--prompt hf://me/my-prompt" in card
    assert not (folder / "README.md").exists()  # the user's folder is left as it was
    assert model_card(folder, "me/x").count("## Score") == 0
    assert main(["prompts", "push", str(folder), "not-a-repo"]) == 2
    assert "expected a repository id owner/name" in capsys.readouterr().err
    # the evaluation's folder stands for its score.json; a training run's folder is named as such, with its prompts
    card_before = sent["files"]["README.md"]
    assert main(["prompts", "push", str(folder), "me/my-prompt", "--score", str(tmp_path), "--private", "--token", "t0k"]) == 0
    assert sent["files"]["README.md"] == card_before  # the same card, byte for byte (its tensors listed in name order: safetensors reads them in no fixed order)
    run = tmp_path / "run"
    prompt.save(run / "best")
    capsys.readouterr()
    assert main(["prompts", "push", str(run), "me/my-prompt"]) == 2
    assert capsys.readouterr().err.strip() == f"sd4match: error: {run}: a training run's folder, not a prompt folder: its prompts are {run / 'best'}"


def test_a_prompt_with_its_adapter_travels_whole(feat, tmp_path, monkeypatch, capsys):
    """A prompt trained with --adapt lora is its prompt and its adapter: push sends both (before:
    only prompt.safetensors and config.json, so hf:// gave the base UNet's features, silently),
    the card and `prompts show` name the adapter, and a download asks for its files too."""
    import huggingface_hub

    from sd4match.features.adapters import Adapter, AdapterConfig

    prompt = make_prompt("single", feat, seed=2)
    folder = prompt.save(tmp_path / "p")
    Adapter(feat.unet, AdapterConfig("lora", up_block=1, rank=2, alpha=2.0, targets=["to_q"])).save(folder)
    sent = {}

    class StubApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None):
            sent.update({p.name: p.read_bytes() for p in folder_path.iterdir()})
            return "https://huggingface.co/me/lora/commit/x"

    monkeypatch.setattr("huggingface_hub.HfApi", StubApi)
    assert main(["prompts", "push", str(folder), "me/lora"]) == 0
    assert set(sent) == {"prompt.safetensors", "config.json", "adapter.safetensors", "adapter.json", "README.md"}
    assert sent["adapter.safetensors"] == (folder / "adapter.safetensors").read_bytes()
    n_lora = sum(m.weight.numel() // m.weight.shape[1] * 2 + m.weight.shape[1] * 2 for n, m in feat.unet.named_modules()
                 if n.endswith(".to_q") and (n.startswith(("down_blocks", "mid_block", "up_blocks.0", "up_blocks.1"))))  # (out + in) x rank 2
    line = f"lora adapter (LoRA rank 2, alpha 2, on to_q; blocks up to up_blocks[1]): {n_lora:,} values in"
    assert f"- **Adapter**: {line}" in sent["README.md"].decode()
    capsys.readouterr()
    assert main(["prompts", "show", str(folder)]) == 0
    assert line in capsys.readouterr().out
    asked = {}

    def stub_download(repo, local_files_only=False, **kw):
        if local_files_only:
            raise FileNotFoundError("not cached")
        asked.update(kw)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stub_download)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert fetch_hub_prompt("hf://me/lora") == folder
    assert set(asked["allow_patterns"]) == {"prompt.safetensors", "config.json", "adapter.safetensors", "adapter.json"}
