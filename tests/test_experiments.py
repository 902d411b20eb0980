"""The paper's open questions as settings: several layers from one UNet pass, noise schedules,
and (with the sweep) the grid over them; tiny random SD."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer
from sd4match.testing import tiny_sd


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("m") / "sd2")


def pictures():
    rng = np.random.default_rng(0)
    return [Image.new("RGB", (90, 70), (200, 40, 10)), Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8))]


def test_several_layers_from_one_pass_equal_the_single_layer_runs(sd_path):
    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=2)
    calls = []
    h = feat.unet.conv_in.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            both = feat(pictures(), generator=torch.Generator().manual_seed(3), layers=(0, 1))
    finally:
        h.remove()
    assert len(calls) == 1 and set(both) == {0, 1}  # one UNet pass for the two layers
    for k in (0, 1):
        feat.reconfigure(up_block=k)
        with torch.no_grad():
            one = feat(pictures(), generator=torch.Generator().manual_seed(3))
        assert one.shape == both[k].shape and feat.grid_of(k) == tuple(one.shape[-1:-3:-1])
        assert torch.equal(one, both[k]), k
    with pytest.raises(Sd4MatchError, match="layers must be in"):
        feat(pictures(), layers=(7,))


def test_schedules_with_equal_cumulative_alphas_give_identical_features(sd_path):
    """Noising at t depends only on the cumulative alphas: DDPM, DDIM and PNDM on the model's
    betas noise alike (bit for bit); Euler noises as x + sigma * noise, scaled back as its
    scale_model_input does, so it agrees to float precision; another beta schedule does not."""
    feat = SDFeaturizer.from_pretrained(sd_path, resolution=64, ensemble=2)
    base = type(feat.scheduler).__name__

    def maps(schedule):
        feat.reconfigure(noise_schedule=schedule)
        with torch.no_grad():
            return feat(pictures(), generator=torch.Generator().manual_seed(1))

    beta = feat.scheduler.config.beta_schedule
    ref = maps("model")
    for same in ("DDPM", "DDIM", "PNDM", f"model:{beta}"):
        assert torch.equal(maps(same), ref), same
    torch.testing.assert_close(maps("Euler"), ref, rtol=1e-4, atol=1e-4)
    other = "linear" if beta != "linear" else "squaredcos_cap_v2"
    assert (maps(f"DDPM:{other}") - ref).abs().max() > 1e-3
    assert feat.settings()["noise_schedule"] == f"DDPM:{other}"
    feat.reconfigure(noise_schedule="model")
    assert "noise_schedule" not in feat.settings()  # the default keeps the keys of stored maps
    for bad, msg in (("Foo", "unknown scheduler"), ("DDIM:cubic", "unknown beta schedule")):
        with pytest.raises(Sd4MatchError, match=msg):
            feat.reconfigure(noise_schedule=bad)
    assert base
