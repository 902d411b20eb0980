"""EfficientNet-Lite0 with its real ImageNet weights: real features on real images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd4match.data import load_image, open_dataset
from sd4match.features import load_featurizer
from sd4match.features.effnet import SameConv2d, load_effnet_lite0
from sd4match.matching import argmax_cells, point_correlation
from sd4match.metrics import score


def test_same_padding_matches_tensorflow_rule():
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    # TF "same", stride 2, k 3 on width 6: out 3, total pad max((3-1)*2 + 3 - 6, 0) = 1 -> (0 left, 1 right)
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 3, 6).contiguous()
    out = conv(x)
    assert out.shape[-1] == 3
    # first output column: rows -1..1 (pad 0 on top, 1 below for height 3 -> out 2 rows) over cols 0..2
    assert out[0, 0, 0, 0].item() == pytest.approx(2 * (0 + 1 + 2))


def test_imagenet_prediction_on_a_real_photo(fixture_images):
    net = load_effnet_lite0()
    im = load_image(fixture_images / "bird.jpg").resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        top = net((x - 127) / 128).softmax(-1)[0].argmax().item()
    assert top in range(7, 25)  # ImageNet classes 7..24 are birds (cock .. great grey owl)


def test_nearest_neighbour_pck_on_pf_willow(willow_root):
    feat = load_featurizer("effnet-lite0")
    recs = open_dataset("pfwillow", willow_root).pairs("test")
    maps = {}
    for rel in sorted({r.src for r in recs} | {r.trg for r in recs}):
        maps[rel] = feat([load_image(willow_root / rel)])
    preds = {}
    for r in recs:
        src_cells = torch.from_numpy(feat.pixel_to_cell(r.src_kps, r.src_size)).float()[None]
        cells, _ = argmax_cells(point_correlation(maps[r.src], maps[r.trg], src_cells))
        preds[r.id] = feat.cell_to_pixel(cells[0].double().numpy(), r.trg_size)
    pck = score(recs, preds, protocol="standard", alphas=[0.1])["per_image"]["all"]["0.1"]
    print(f"effnet-lite0 nn PCK@0.1 per image (standard) on {len(recs)} PF-Willow pairs: {pck:.4f}")
    assert pck >= 0.35
    # random target points score far lower (about 0.02): the floor is not met by chance
    rng = np.random.default_rng(0)
    rand = {r.id: rng.uniform(0, 1, (r.n_points, 2)) * np.array(r.trg_size) for r in recs}
    assert score(recs, rand, protocol="standard", alphas=[0.1])["per_image"]["all"]["0.1"] < 0.1


def test_diffusion_settings_given_to_effnet_are_said_to_change_nothing(tmp_path, capsys):
    """effnet-lite0 has no timestep or ensemble: given, they are named in one warning line
    (and the features are those of the defaults); not given, nothing is said."""
    from sd4match.cli import main

    examples = Path(__file__).resolve().parents[1] / "examples"
    pics = [str(examples / "cat.jpg"), str(examples / "pets.jpg")]
    assert main(["match", *pics, "--points", "229,149", "--model", "effnet-lite0", "--timestep", "50", "--ensemble", "2", "--out", str(tmp_path / "a")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == ["sd4match: warning: effnet-lite0 is not a diffusion model: --timestep 50, --ensemble 2 change nothing"]
    assert main(["match", *pics, "--points", "229,149", "--model", "effnet-lite0", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err
    a, b = (json.loads((tmp_path / d / "matches.json").read_text())["matches"] for d in "ab")
    assert a == b
