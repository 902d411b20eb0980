"""SD featurizer on tiny random Stable Diffusion models saved to disk (same code path as SD 2.1)."""

import numpy as np
import pytest
import torch

from sd4match.errors import Sd4MatchError
from sd4match.features.sd import SDFeaturizer
from sd4match.testing import tiny_sd


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tiny") / "sd2", seed=0, style="sd2")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tiny") / "sd1", seed=0, style="sd1")


def full_forward_block(full, k, noisy, t, cond):
    """(the full UNet forward's output, what up_blocks[k] gave inside it), read by a hook."""
    seen = {}
    h = full.up_blocks[k].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    try:
        with torch.no_grad():
            out = full(noisy, t, encoder_hidden_states=cond).sample
    finally:
        h.remove()
    return out, seen["out"]


def images(b=2, h=96, w=128, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_early_exit_equals_full_forward_for_every_block(style, tiny_sd1, tiny_sd2):
    from diffusers import UNet2DConditionModel

    path = tiny_sd1 if style == "sd1" else tiny_sd2
    feat = SDFeaturizer.from_pretrained(path, resolution=64, ensemble=1)
    assert feat.unet.config.use_linear_projection == (style == "sd2")
    assert feat.prompt_dim == (24 if style == "sd1" else 32)
    full = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()  # a second, hook-free copy
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([261, 50, 900])
    cond = torch.randn(3, 77, feat.prompt_dim, generator=g)
    for k in range(len(full.up_blocks)):
        feat.reconfigure(up_block=k)
        out, block = full_forward_block(full, k, noisy, t, cond)
        with torch.no_grad():
            early = feat.unet_features(noisy, t, cond)
        assert out.shape == noisy.shape  # the full forward did run to conv_out
        torch.testing.assert_close(early, block, rtol=1e-5, atol=1e-6)
        assert tuple(early.shape[-2:]) == (feat.grid_size[1], feat.grid_size[0])
        with torch.no_grad():  # the fallback for UNets the public-blocks path does not cover: a hook during the call
            hooked = feat._hooked(noisy, t, cond)
        torch.testing.assert_close(hooked, block, rtol=1e-5, atol=1e-6)
        assert not feat.unet.up_blocks[k]._forward_hooks  # and it is gone after the call


def test_no_later_block_runs(tiny_sd2):
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2, up_block=1)

    def fail(name):
        def hook(module, args):
            raise AssertionError(f"{name} ran")

        return hook

    hooks = [feat.unet.up_blocks[k].register_forward_pre_hook(fail(f"up_blocks[{k}]")) for k in range(2, len(feat.unet.up_blocks))]
    hooks += [feat.unet.conv_out.register_forward_pre_hook(fail("conv_out"))]
    if feat.unet.conv_norm_out is not None:
        hooks.append(feat.unet.conv_norm_out.register_forward_pre_hook(fail("conv_norm_out")))
    ran = []
    hooks.append(feat.unet.up_blocks[1].register_forward_pre_hook(lambda m, a: ran.append(1)))
    out = feat(images(), generator=torch.Generator().manual_seed(0))
    assert ran and out.shape == (2, feat.feature_dim, 8, 8)
    # without the early exit, the full UNet trips the hooks: they are not vacuous
    with pytest.raises(AssertionError, match="ran"):
        feat.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32), return_dict=False)
    for h in hooks:
        h.remove()


def test_pipeline_equals_manual_composition(tiny_sd2):
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet").eval()  # hook-free copy
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=3, timestep=261)
    x = images(b=2, h=50, w=70)
    out = feat(x, text=["a cat", "a dog"], generator=torch.Generator().manual_seed(5))
    # the same stages written out by hand with the loaded diffusers modules
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x64 = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        z = feat.vae.encode(2 * x64 - 1).latent_dist.sample(generator=g) * feat.vae.config.scaling_factor
        z = z.repeat_interleave(3, 0)
        noise = torch.randn(z.shape, generator=g)
        noisy = feat.scheduler.add_noise(z, noise, torch.full((6,), 261))
        ids = feat.tokenizer(["a cat", "a dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond = feat.text_encoder(ids)[0].repeat_interleave(3, 0)
        seen = []
        unet.up_blocks[1].register_forward_hook(lambda m, a, o: seen.append(o))
        unet(noisy, torch.full((6,), 261), encoder_hidden_states=cond)
    ref = seen[0].view(2, 3, *seen[0].shape[1:]).mean(1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_seeded_and_chunked(tiny_sd2):
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=4, max_batch=8)
    x = images(b=3)
    a = feat(x, generator=torch.Generator().manual_seed(0))
    b = feat(x, generator=torch.Generator().manual_seed(0))
    c = feat(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    feat.reconfigure(max_batch=1)
    torch.testing.assert_close(feat(x, generator=torch.Generator().manual_seed(0)), a, rtol=1e-5, atol=1e-6)
    feat.reconfigure(deterministic_latent=True, ensemble=1)
    d1 = feat(x, generator=torch.Generator().manual_seed(0))
    feat.reconfigure(ensemble=2)
    d2 = feat(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(d1, d2)  # the noise differs, so the average does too


def test_text_and_embeddings_agree_and_gradients_reach_prompt(tiny_sd2):
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2)
    x = images(b=2)
    a = feat(x, text=["a photo of a cat"] * 2, generator=torch.Generator().manual_seed(0))
    emb = feat.encode_text(["a photo of a cat"])
    b = feat(x, prompt_embeds=emb, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    p = emb.clone().requires_grad_(True)
    feat(x, prompt_embeds=p, generator=torch.Generator().manual_seed(0)).square().mean().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(q.grad is None for q in feat.parameters())
    with pytest.raises(Sd4MatchError, match="prompt_embeds must be"):
        feat(x, prompt_embeds=torch.zeros(3, 77, 32))


def test_pil_input_and_cell_map(tiny_sd2):
    from PIL import Image

    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=1)
    ims = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("L", (120, 90), 128)]
    out = feat(ims, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, feat.feature_dim, 8, 8)
    cm = feat.cell_map((300, 200))
    # the official mapping by hand: x' = x * 64 / 300, cell = x' * 7 / 63; y likewise with 200
    np.testing.assert_allclose(cm.pixel_to_cell([[150.0, 25.0]]), [[150 * 64 / 300 * 7 / 63, 25 * 64 / 200 * 7 / 63]])
    np.testing.assert_allclose(cm.cell_to_pixel([[0.0, 0.0], [7.0, 7.0]]), [[0.0, 0.0], [63 * 300 / 64, 63 * 200 / 64]])  # corner cells
    t = torch.tensor([[37.0, 141.0]])
    torch.testing.assert_close(feat.cell_to_pixel(feat.pixel_to_cell(t, (300, 200)), (300, 200)), t)


def test_pictures_of_any_form_give_the_features_the_cli_gives(tiny_sd2, tmp_path):
    """A transparent RGBA picture and a 16-bit one handed to the featurizer from Python give
    the features of the picture the CLI reads from their files (on white, scaled from 16
    bits): before, Python's .convert("RGB") dropped the alpha (black behind it) and clipped
    16-bit values. uint8 arrays equal their PIL image; a list of tensors is refused with the
    fix named."""
    from PIL import Image

    from sd4match.data.images import load_image

    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=1)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    alpha = np.zeros((48, 40), np.uint8)
    alpha[:, 20:] = 255  # left half transparent
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray((rng.integers(0, 65536, (48, 40))).astype(np.uint16)).save(tmp_path / "b.png")
    shown = [load_image(tmp_path / "a.png"), load_image(tmp_path / "b.png")]
    # the truth by hand: white where transparent, rgb where opaque; 16 bits to 8 by x / 65535 * 255
    want_a = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(shown[0]), want_a)
    b16 = np.asarray(Image.open(tmp_path / "b.png"), dtype=np.float64)
    np.testing.assert_array_equal(np.asarray(shown[1])[..., 0], np.clip(b16 / 65535 * 255 + 0.5, 0, 255).astype(np.uint8))

    def run(ims):
        return feat(ims, generator=torch.Generator().manual_seed(0))

    ref = run(shown)
    opened = [Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")]
    assert opened[0].mode == "RGBA" and opened[1].mode.startswith("I")
    assert torch.equal(run(opened), ref)
    assert torch.equal(run([np.asarray(im) for im in shown]), ref)
    assert torch.equal(run(np.asarray(shown[0])), run(shown[:1]))  # one picture alone, not in a list
    with pytest.raises(Sd4MatchError, match=r"item 0 is a Tensor \(stack them: torch.stack\(images\)\)"):
        run([torch.rand(3, 32, 32)])
    with pytest.raises(Sd4MatchError, match=r"image 1: an array must be uint8 .*got float32 \(48, 40, 3\)"):
        run([rgb, rgb.astype(np.float32)])


def test_bad_settings(tiny_sd2):
    with pytest.raises(Sd4MatchError, match="up_block must be in 0..2"):
        SDFeaturizer.from_pretrained(tiny_sd2, up_block=3)
    with pytest.raises(Sd4MatchError, match="timestep must be in 0..999"):
        SDFeaturizer.from_pretrained(tiny_sd2, timestep=1000)
    with pytest.raises(Sd4MatchError, match="multiple of 8"):
        SDFeaturizer.from_pretrained(tiny_sd2, resolution=100)


def test_bf16_autocast_stays_close_and_returns_fp32(tiny_sd2):
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2)
    x = images(b=2)
    ref = feat(x, generator=torch.Generator().manual_seed(0))
    feat.reconfigure(amp_dtype="bf16")
    out = feat(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05  # bf16 did run (not bit-equal) and stays within a few percent
    with pytest.raises(Sd4MatchError, match="amp_dtype"):
        feat.reconfigure(amp_dtype="fp8")


def _hook_counts(unet):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()]


def test_two_featurizers_share_modules_and_leave_no_hooks(tiny_sd2):
    a = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2, up_block=1)
    b = SDFeaturizer(a.unet, a.vae, a.text_encoder, a.tokenizer, a.scheduler, a.config.__class__(up_block=2, resolution=64, ensemble=2))
    before = _hook_counts(a.unet)
    x = images(b=1)
    fa = a(x, generator=torch.Generator().manual_seed(0))
    fb = b(x, generator=torch.Generator().manual_seed(0))
    fa2 = a(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fa, fa2) and fb.shape[1] == b.feature_dim != a.feature_dim
    alone = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2, up_block=2)  # its own modules
    torch.testing.assert_close(fb, alone(x, generator=torch.Generator().manual_seed(0)), rtol=0, atol=0)
    assert _hook_counts(a.unet) == before


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("ensemble", [1, 8])
def test_posteriors_given_equal_the_direct_path_bit_for_bit(tiny_sd2, deterministic, ensemble):
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=ensemble, deterministic_latent=deterministic)
    x = images(b=3)
    direct = feat(x, generator=torch.Generator().manual_seed(3))
    post = feat.posterior(feat.preprocess(x))
    stored = feat(None, posteriors=post, generator=torch.Generator().manual_seed(3))
    assert torch.equal(direct, stored)
    # the store's sample is diffusers' own sample: mean + std * randn(generator)
    with torch.no_grad():
        dist = feat.vae.encode(2 * feat.preprocess(x) - 1).latent_dist
    torch.testing.assert_close(post[0], dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(post[1], dist.std, rtol=0, atol=0)


def test_per_picture_generators_make_features_independent_of_the_batch(tiny_sd2):
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=4, max_batch=32)
    x = images(b=3)
    seeds = [11, 12, 13]
    batched = feat(x, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for i, s in enumerate(seeds):
        alone = feat(x[i : i + 1], generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_compiled_early_exit_equals_the_full_forward(style, tiny_sd1, tiny_sd2):
    """torch.compile of the early-exit function and the VAE: the same features as eager (slow: compiles)."""
    from diffusers import UNet2DConditionModel

    path = tiny_sd1 if style == "sd1" else tiny_sd2
    feat = SDFeaturizer.from_pretrained(path, resolution=64, ensemble=2, compile=True)
    full = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    g = torch.Generator().manual_seed(1)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([261, 50])
    cond = torch.randn(2, 77, feat.prompt_dim, generator=g)
    for k in range(len(full.up_blocks)):
        feat.reconfigure(up_block=k)
        _, block = full_forward_block(full, k, noisy, t, cond)
        with torch.no_grad():
            early = feat.unet_features(noisy, t, cond)
        torch.testing.assert_close(early, block, rtol=1e-4, atol=1e-5)
    x = images(b=2)
    eager = SDFeaturizer.from_pretrained(path, resolution=64)
    torch.testing.assert_close(feat.posterior(feat.preprocess(x))[0], eager.posterior(eager.preprocess(x))[0], rtol=1e-4, atol=1e-5)


_SIZES_SCRIPT = """
import sys, torch
from sd4match.features.sd import SDFeaturizer, _vae_posterior
feat = SDFeaturizer.from_pretrained(sys.argv[1], resolution=64, compile=True)
eager = SDFeaturizer.from_pretrained(sys.argv[1], resolution=64)
plain = torch.compile(_vae_posterior) if sys.argv[2] == "plain" else None  # torch.compile's default, the control
for b in (1, 2, 1):
    x = torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        got = plain(feat.vae, 2 * x - 1) if plain else feat.posterior(x)
        torch.testing.assert_close(got[0], eager.posterior(x)[0], rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
def test_compiled_graphs_stay_static_when_the_call_size_changes(tiny_sd2):
    """Calls of sizes 1, 2, 1 through the compiled VAE: torch.compile never marks a dimension
    dynamic (TORCH_LOGS=dynamic says when it does), where its default does, on the same
    calls (the control shows the log would tell). Slow: compiles."""
    import os
    import subprocess
    import sys

    runs = {}
    for kind in ("ours", "plain"):
        p = subprocess.run([sys.executable, "-c", _SIZES_SCRIPT, str(tiny_sd2), kind], env={**os.environ, "TORCH_LOGS": "dynamic"},
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]
        runs[kind] = p.stderr
    assert "as dynamic" in runs["plain"] and "as dynamic" not in runs["ours"]


def test_hooked_fallback_reads_several_layers_in_one_pass(tiny_sd2):
    """The fallback path (UNets the public-blocks path does not cover) with several layers:
    hooks on each, the deepest stops the forward, each output equals the early exit's."""
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=1)
    g = torch.Generator().manual_seed(2)
    noisy, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([261, 50]), torch.randn(2, 77, feat.prompt_dim, generator=g)
    with torch.no_grad():
        got = feat._hooked(noisy, t, cond, (0, 1))
        want = feat.unet_features(noisy, t, cond, layers=(0, 1))
    assert set(got) == {0, 1}
    for k in (0, 1):
        torch.testing.assert_close(got[k].float(), want[k], rtol=1e-5, atol=1e-6)
    assert not any(b._forward_hooks for b in feat.unet.up_blocks)


def test_compile_modes_reach_torch_compile_and_graph_outputs_are_copied(tiny_sd2, monkeypatch):
    """``--compile reduce-overhead`` / ``max-autotune``: the mode reaches torch.compile (here a
    recording stand-in, so nothing compiles) with ``dynamic=False``, each call starts a new
    CUDA-graph step and its outputs are copies (a graph replay reuses its output memory);
    the features equal eager."""
    from sd4match.config import compile_choice

    assert compile_choice("off", "cuda") == (False, "default") and compile_choice("auto", "cpu") == (False, "default")
    assert compile_choice("auto", "cuda") == (True, "default") and compile_choice("on", "cpu") == (True, "default")
    assert compile_choice("max-autotune", "cpu") == (True, "max-autotune")
    with pytest.raises(Sd4MatchError, match="compile_mode must be one of"):
        SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, compile=True, compile_mode="fast")
    modes, outs, steps = [], [], []

    def fake_compile(fn, mode=None, dynamic=None):
        assert dynamic is False  # static shapes: one graph per call size, never a symbolic batch
        modes.append(mode)

        def run(*args):
            outs.append(fn(*args))
            return outs[-1]
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2, compile=True, compile_mode="reduce-overhead")
    eager = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2)
    x = images(b=2)
    with torch.no_grad():
        got = feat(x, generator=torch.Generator().manual_seed(0))
        want = eager(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    assert modes == ["reduce-overhead", "reduce-overhead"] and len(steps) == 2  # the VAE's function, then the UNet's: one step each call
    mean, std = feat.posterior(feat.preprocess(x))
    assert mean.data_ptr() != outs[-1][0].data_ptr()  # a copy, not the graph's own output memory
    feat.reconfigure(compile_mode="max-autotune")
    with torch.no_grad():
        feat(x, generator=torch.Generator().manual_seed(0))
    assert modes[-2:] == ["max-autotune", "max-autotune"]  # recompiled under the new mode


def _sdp_flags():
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled()


def test_kernel_settings_hold_inside_the_calls_only_and_keep_the_features(tiny_sd2):
    """``channels_last``, ``attention`` and ``cudnn_benchmark`` (the throughput levers): inside
    the UNet and VAE calls the weights and inputs are channels-last, only the named SDPA
    backend is enabled and cuDNN's search is on; after a call (a failed one too) torch's
    process-wide switches are as they were, and the features equal the plain featurizer's
    (float noise: another convolution kernel)."""
    plain = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2)
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=2, channels_last=True, attention="math", cudnn_benchmark=True)
    cl = torch.channels_last
    assert feat.unet.conv_in.weight.is_contiguous(memory_format=cl) and feat.vae.encoder.conv_in.weight.is_contiguous(memory_format=cl)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=cl)
    before = (_sdp_flags(), torch.backends.cudnn.benchmark)
    assert before == ((True, True, True, True), False)  # torch's defaults: every backend, no search
    seen = []

    def look(m, args):
        seen.append((m.__class__.__name__, args[0].is_contiguous(memory_format=cl), _sdp_flags(), torch.backends.cudnn.benchmark))

    hs = [feat.unet.conv_in.register_forward_pre_hook(look), feat.vae.encoder.conv_in.register_forward_pre_hook(look)]
    try:
        x = images(b=2)
        with torch.no_grad():
            got = feat(x, generator=torch.Generator().manual_seed(0))
            want = plain(x, generator=torch.Generator().manual_seed(0))
    finally:
        for h in hs:
            h.remove()
    assert len(seen) == 2 and all(s[1:] == (True, (False, False, True, False), True) for s in seen), seen
    assert (_sdp_flags(), torch.backends.cudnn.benchmark) == before
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a call that fails inside the UNet sets them back too
    h = feat.unet.conv_in.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("boom")))
    try:
        with pytest.raises(ValueError, match="boom"), torch.no_grad():
            feat(x, generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
    assert (_sdp_flags(), torch.backends.cudnn.benchmark) == before
    # .to() keeps the format; turning the setting off turns the weights back
    feat.to(torch.float64)
    assert feat.unet.conv_in.weight.dtype == torch.float64 and feat.unet.conv_in.weight.is_contiguous(memory_format=cl)
    feat.to(torch.float32).reconfigure(channels_last=False)
    assert feat.unet.conv_in.weight.is_contiguous() and feat.vae.encoder.conv_in.weight.is_contiguous()
    # a format the caller gave the modules is theirs: settings that leave channels_last alone leave it alone
    plain.unet.to(memory_format=cl)
    plain.reconfigure(ensemble=1, attention="auto")
    assert plain.unet.conv_in.weight.is_contiguous(memory_format=cl)
    assert "channels_last" not in feat.settings() and "attention" not in feat.settings()  # kernels, not what the features are: same store keys


def test_an_attention_backend_the_device_lacks_is_named(tiny_sd2):
    with pytest.raises(Sd4MatchError, match="attention must be one of auto, flash, efficient, cudnn, math"):
        SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, attention="fastest")
    before = _sdp_flags()
    feat = SDFeaturizer.from_pretrained(tiny_sd2, resolution=64, ensemble=1, attention="efficient")  # memory-efficient SDPA: CUDA only
    if torch.cuda.is_available():
        pytest.skip("this test needs a machine without CUDA")
    with pytest.raises(Sd4MatchError, match="attention 'efficient': torch has no such kernel .* use --attention auto"), torch.no_grad():
        feat(images(b=1), generator=torch.Generator().manual_seed(0))
    assert _sdp_flags() == before


def test_kernel_flags_reach_the_featurizer_and_auto_follows_the_measured_table(tiny_sd2, monkeypatch):
    from sd4match import config
    from sd4match.cli import build_parser, load_model

    assert config.kernel_choice(config.ModelConfig(), "cuda") == {"channels_last": False, "attention": "auto", "cudnn_benchmark": False}
    on = config.ModelConfig(channels_last="on", cudnn_benchmark="on", attention="math")
    assert config.kernel_choice(on, "cpu") == {"channels_last": True, "attention": "math", "cudnn_benchmark": True}
    monkeypatch.setitem(config.KERNELS_AUTO, "cudnn_benchmark", ("cuda",))  # what a GPU measurement would write
    assert config.kernel_choice(config.ModelConfig(), "cuda")["cudnn_benchmark"] is True
    assert config.kernel_choice(config.ModelConfig(), "cpu")["cudnn_benchmark"] is False
    assert config.kernel_choice(config.ModelConfig(cudnn_benchmark="off"), "cuda")["cudnn_benchmark"] is False
    with pytest.raises(Sd4MatchError, match="attention 'fastest'"):
        config.ModelConfig(attention="fastest")
    args = build_parser().parse_args(["features", "--model", str(tiny_sd2), "--images", "x", "--out", "y", "--device", "cpu", "--resolution", "64",
                                      "--channels-last", "on", "--attention", "math", "--cudnn-benchmark", "on"])
    from sd4match.cli import config_from_args

    feat = load_model(config_from_args(config.ModelConfig, args))
    assert (feat.config.channels_last, feat.config.attention, feat.config.cudnn_benchmark) == (True, "math", True)
    assert feat.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
