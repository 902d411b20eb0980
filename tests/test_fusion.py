"""SD + DINOv2 fusion and DINOv2 alone as models every command takes (tiny random models,
real PF-Willow fixture)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import official_dino_hidden
from PIL import Image

from sd4match.cli import main
from sd4match.features import DinoFeaturizer, SDFeaturizer, load_featurizer
from sd4match.testing import tiny_dinov2, tiny_sd

FAST = ["--resolution", "64", "--ensemble", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    return tiny_sd(d / "sd"), tiny_dinov2(d / "dino")


@pytest.mark.parametrize("dino_input", ["official", "imagenet"])
def test_fused_features_equal_the_official_formula(models, willow_root, dino_input):
    from transformers import Dinov2Model

    sd_path, dino_path = models
    fused = load_featurizer(f"{sd_path}+{dino_path}", resolution=64, ensemble=2, dino_input=dino_input)
    sd = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=2)
    dino = Dinov2Model.from_pretrained(dino_path).eval()
    imgs = [Image.open(p).convert("RGB") for p in sorted((willow_root / "PF-dataset" / "duck(S)").glob("*.png"))[:2]]
    with torch.no_grad():
        got = fused(imgs, text=["a photo of a duck"] * 2, generator=torch.Generator().manual_seed(4))
        # by hand: SD half
        f_sd = sd(imgs, text=["a photo of a duck"] * 2, generator=torch.Generator().manual_seed(4))  # (2, C, 8, 8)
        # DINOv2 half: the picture as SD sees it (64 x 64, bilinear), in [-1, 1] (official) or ImageNet-normalised,
        # resized to (14 x 8) x (14 x 8) without antialiasing, patch tokens without CLS, on the SD grid
        x = torch.stack([torch.from_numpy(np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32) / 255).permute(2, 0, 1) for im in imgs])
        if dino_input == "official":
            inp = 2 * x - 1
        else:
            inp = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        inp = F.interpolate(inp, size=(112, 112), mode="bilinear", align_corners=False, antialias=False)
        tok = official_dino_hidden(dino, inp)[:, 1:]  # (2, 64, 32), the authors' position-embedding interpolation
        f_dn = tok.transpose(1, 2).reshape(2, 32, 8, 8)
    norm = lambda f: f / (f.norm(dim=1, keepdim=True) + 1e-6)  # noqa: E731
    want = torch.cat([0.5 * norm(f_sd), 0.5 * norm(f_dn)], dim=1)
    assert got.shape == (2, sd.feature_dim + 32, 8, 8) and fused.feature_dim == sd.feature_dim + 32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused.cell_map((300, 200)).pixel_to_cell([[150.0, 100.0]]).tolist() == sd.cell_map((300, 200)).pixel_to_cell([[150.0, 100.0]]).tolist()


def test_fused_model_in_every_command(models, willow_root, tmp_path, capsys):
    sd_path, dino_path = models
    model = f"{sd_path}+{dino_path}"
    a, b = sorted((willow_root / "PF-dataset" / "car(G)").glob("*.png"))[:2]
    assert main(["match", str(a), str(b), "--points", "50,60;120,80", "--model", model, *FAST, "--out", str(tmp_path / "m")]) == 0
    assert len(json.loads((tmp_path / "m" / "matches.json").read_text())["matches"]) == 2
    targets = tmp_path / "t"
    targets.mkdir()
    for f in sorted((willow_root / "PF-dataset" / "car(S)").glob("*.png"))[:2]:
        (targets / f.name).write_bytes(f.read_bytes())
    assert main(["transfer", "--source", str(a), "--points", "50,60", "--targets", str(targets), "--model", model, *FAST, "--no-progress",
                 "--out", str(tmp_path / "tr")]) == 0
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--model", model, *FAST, "--limit", "8",
                 "--prompt", "text", "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    score = json.loads((tmp_path / "ev" / "score.json").read_text())
    assert score["n_pairs"] == 8 and score["run"]["config"]["settings"]["featurizer"] == "sd+dinov2"
    assert main(["train", "--dataset", "synthetic", "--root", str(willow_root), "--prompt", "single", "--model", model, "--resolution", "64",
                 "--steps", "2", "--batch-size", "2", "--val-every", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "tr-run")]) == 0
    assert (tmp_path / "tr-run" / "best" / "prompt.safetensors").is_file()

    from fastapi.testclient import TestClient

    from sd4match.serve import create_app
    from sd4match.usermatch import Matcher

    app = create_app(Matcher(load_featurizer(model, resolution=64, ensemble=1)))
    with TestClient(app) as c:
        ids = []
        for p in (a, b):
            with open(p, "rb") as fh:
                ids.append(c.post("/api/images", files={"file": (p.name, fh)}).json()["id"])
        r = c.post("/api/match", json={"a": ids[0], "b": ids[1], "x": 50.0, "y": 60.0}).json()
        assert len(r["target"]) == 2 and -1 <= r["score"] <= 1


def test_training_learns_the_sd_half_only(models, willow_root, tmp_path):
    from sd4match.train import TrainConfig, Trainer

    sd_path, dino_path = models
    feat = load_featurizer(f"{sd_path}+{dino_path}", resolution=64, ensemble=1)
    frozen = {k: v.clone() for k, v in feat.dino.state_dict().items()}
    cfg = TrainConfig(dataset="synthetic", root=str(willow_root), prompt="single", model="-", resolution=64, steps=2, batch_size=2, val_every=0,
                      device="cpu")
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, progress=False)
    before = t.prompt.tokens.detach().clone()
    t.train_step()
    t.train_step()
    assert not torch.equal(before, t.prompt.tokens.detach())  # the prompt (SD half) learned
    assert all(torch.equal(v, frozen[k]) for k, v in feat.dino.state_dict().items())  # DINOv2 did not


def test_dinov2_alone_end_to_end_and_its_cell_mapping(models, willow_root, tmp_path):
    _, dino_path = models
    d = load_featurizer(dino_path, resolution=112)
    assert isinstance(d, DinoFeaturizer) and d.grid_size == (8, 8) and d.settings()["mode"] == "squash"
    for size in ((300, 300), (300, 200), (123, 457)):
        cm = d.cell_map(size)
        W, H = size
        # patch i covers squashed pixels [14 i, 14 (i + 1)): its centre (i + 0.5) * 14 / 112 * W is cell i
        np.testing.assert_allclose(cm.pixel_to_cell([[2.5 * W / 8, 5.5 * H / 8]]), [[2.0, 5.0]], atol=1e-12)
        px = np.array([[0.0, 0.0], [W * 0.3, H * 0.9], [W, H]])
        np.testing.assert_allclose(cm.cell_to_pixel(cm.pixel_to_cell(px)), px, atol=1e-9)
    with pytest.raises(Exception, match="multiple of 14"):
        load_featurizer(dino_path, resolution=100)
    out = tmp_path / "ev"
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--preset", "dinov2", "--model", str(dino_path),
                 "--resolution", "112", "--device", "cpu", "--limit", "8", "--no-progress", "--out", str(out)]) == 0
    score = json.loads((out / "score.json").read_text())
    cfg = score["run"]["config"]
    assert cfg["preset"] == "dinov2" and cfg["rule"] == "nn" and cfg["prompt"] == "empty"  # the preset's settings, printed
    assert cfg["settings"]["resolution"] == 112 and cfg["settings"]["featurizer"] == "dinov2"  # an explicit flag overrides the preset


def test_an_sd_preset_with_a_model_that_is_not_sd_names_the_preset(willow_root, tmp_path, capsys, no_model_load):
    """``--preset dift --model effnet-lite0`` said "effnet-lite0 takes no prompt; use --prompt
    empty" of a prompt the user never gave (the preset's). An SD model of another source
    (a local folder of SD 2.1) keeps the recipe."""
    common = ["--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--limit", "2", "--no-progress"]
    for cmd, grid in (("evaluate", []), ("sweep", ["--timesteps", "261", "--up-blocks", "1"])):
        assert main([cmd, *common, *grid, "--preset", "dift", "--model", "effnet-lite0", "--out", str(tmp_path / cmd)]) == 2
        assert capsys.readouterr().err.strip() == (
            "sd4match: error: --preset dift is a Stable Diffusion recipe (model sd-2-1, prompt text, timestep 261, up block 1); "
            "--model effnet-lite0 is not Stable Diffusion: leave out the preset, or give an SD model")
        assert not (tmp_path / cmd).exists()


def test_presets_are_the_published_settings():
    from sd4match.cli import EVAL_PRESETS

    assert EVAL_PRESETS["dift"] == {"model": "sd-2-1", "timestep": 261, "up_block": 1, "ensemble": 8, "prompt": "text", "rule": "nn", "similarity": "cosine"}
    # the SD4Match authors' config/dift.py and fuseDino.py: ENABLE_L2_NORM = False, all four rules reported
    assert EVAL_PRESETS["dift-sd4match"]["similarity"] == EVAL_PRESETS["fusedino-sd4match"]["similarity"] == "dot"
    assert EVAL_PRESETS["fusedino-sd4match"]["model"] == "sd-2-1+dinov2-b" and EVAL_PRESETS["dift-sd4match"]["rule"] == "all"
    assert EVAL_PRESETS["dinov2"]["model"] == "dinov2-b" and EVAL_PRESETS["dinov2"]["resolution"] == 840
    assert EVAL_PRESETS["sd-dino-fuse"]["model"] == "sd-2-1+dinov2-b"
