"""The store and the batched pipelines: work done once, full UNet calls, and predictions equal
to a one-pair-at-a-time run, on the real PF-Willow fixture with tiny random models."""

import json

import numpy as np
import pytest
import torch

from sd4match.data import open_dataset
from sd4match.evaluate import predict_pairs, resolve_prompt
from sd4match.features import DinoFeaturizer, SDFeaturizer
from sd4match.batching import Batcher, Picture
from sd4match.prompts import make_prompt
from sd4match.store import Store
from sd4match.testing import WorkCounter as Work, tiny_dinov2, tiny_sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    return tiny_sd(d / "sd"), tiny_dinov2(d / "dino")


def willow(root, n=None):
    recs = open_dataset("pfwillow", root).pairs("test")
    return recs[:n] if n else recs


def run(feat, prompt, recs, root, dino=None, **kw):
    out = {}
    kw.setdefault("store", Store())
    for pid, kps in predict_pairs(feat, prompt, recs, str(root), seed=0, dino=dino, progress=False, **kw):
        assert not isinstance(kps, BaseException), kps
        out[pid] = kps
    return out


def test_evaluate_runs_each_picture_once_in_full_unet_calls(models, willow_root):
    sd, dn = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=8)
    dino = DinoFeaturizer.from_pretrained(dn)
    recs = willow(willow_root)  # 450 pairs over 50 pictures
    n_pics = len({p for r in recs for p in (r.src, r.trg)})
    w = Work(feat)
    b = Batcher(feat, store=Store())
    try:
        run(feat, resolve_prompt("empty", feat), recs, willow_root, batcher=b)
    finally:
        w.close()
    assert len(w.vae) == len(set(w.vae)) == n_pics  # each picture through the VAE once
    assert {len(c) for c in w.vae_calls} == {8} and len(w.vae_calls) == -(-n_pics // 8)  # 8 pictures a VAE call (the last padded)
    assert b.padded["posterior"] == 8 * len(w.vae_calls) - n_pics == sum(len(c) - len(set(c)) for c in w.vae_calls)
    assert min(w.unet) >= 32 and len(w.unet) == -(-n_pics // 4)  # 4 pictures x 8 copies a call, every call full (the last padded)

    cpm = make_prompt("cpm", feat, dino_dim=dino.feature_dim)
    w = Work(feat, dino)
    b = Batcher(feat, dino=dino, store=Store())
    try:
        run(feat, cpm, recs[:60], willow_root, batcher=b)
    finally:
        w.close()
    pics60 = len({p for r in recs[:60] for p in (r.src, r.trg)})
    assert len(w.vae) == len(set(w.vae)) == pics60 and len(w.dino) == len(set(w.dino)) == pics60
    # the fresh pictures are gathered for whole calls: 8 a VAE call, 16 a DINOv2 call (padding only at the end)
    assert {len(c) for c in w.vae_calls} == {8} and {len(c) for c in w.dino_calls} == {16}
    assert len(w.dino_calls) == -(-pics60 // 16) and b.padded["dino"] == 16 * len(w.dino_calls) - pics60
    assert min(w.unet) >= 2 * 2 * 8 and len(w.unet) == 30  # 2 pairs (4 pictures x 8) a call


@pytest.mark.parametrize("kind", ["empty", "single", "cpm", "cpm-image"])
def test_batched_predictions_equal_one_pair_at_a_time(models, willow_root, kind):
    sd, dn = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=2)
    dino = DinoFeaturizer.from_pretrained(dn) if kind.startswith("cpm") else None
    prompt = resolve_prompt("empty", feat) if kind == "empty" else make_prompt(kind, feat, seed=1, **({"dino_dim": 32} if dino else {}))
    recs = willow(willow_root)[80:110]  # two sub-classes, pictures shared between pairs
    batched = run(feat, prompt, recs, willow_root, dino=dino)
    alone = {}
    for r in recs:  # a fresh store per pair: nothing shared, every picture computed in its own call
        alone.update(run(feat, prompt, [r], willow_root, dino=dino, workers=0))
    assert list(batched) == [r.id for r in recs]
    for pid in batched:
        assert np.array_equal(batched[pid], alone[pid]), pid
    # and the plain featurizer, one picture a call with its content seed, agrees to float precision
    from sd4match.data import load_pair_images
    from sd4match.matching import match_pixels
    from sd4match.store import image_key, seed_for

    if kind != "cpm":
        r = recs[3]
        src, trg = load_pair_images(willow_root, r)
        with torch.no_grad():
            # an image-conditioned CPM: each picture under the prompt of its own DINOv2 tokens
            es, et = ((prompt({"dino": dino.tokens([src])}), prompt({"dino": dino.tokens([trg])})) if kind == "cpm-image" else
                      (prompt({"categories": [r.category]}),) * 2)
            fs = feat([src], prompt_embeds=es, generator=[torch.Generator().manual_seed(seed_for(image_key(src), 0))])
            ft = feat([trg], prompt_embeds=et, generator=[torch.Generator().manual_seed(seed_for(image_key(trg), 0))])
        direct = match_pixels(feat, fs, ft, r.src_kps, r.src_size, r.trg_size, "kernel-softargmax")["kps"].double().numpy()
        np.testing.assert_allclose(batched[r.id], direct, atol=1e-3)


def test_pending_pairs_hold_a_bounded_number_of_pictures_with_the_same_predictions(models, willow_root):
    """Pairs whose pictures are seen interleave with pairs of new pictures (a shuffled split):
    a pair waiting for a full UNet call holds its pictures; the bound forces an early (padded)
    call instead, and the predictions stay the same bit for bit."""
    sd, _ = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=8)  # 4 pictures a UNet call
    recs = willow(willow_root)
    recs = [recs[i] for i in np.random.default_rng(3).permutation(len(recs))[:120]]
    prompt = resolve_prompt("empty", feat)
    free = Batcher(feat, store=Store())
    unbounded = run(feat, prompt, recs, willow_root, batcher=free, pending=10_000)
    assert free.stream_peak["flushes"] == 0 and free.stream_peak["pictures"] > 6  # without a bound, more pictures wait
    tight = Batcher(feat, store=Store())
    w = Work(feat)
    try:
        bounded = run(feat, prompt, recs, willow_root, batcher=tight, pending=6)
    finally:
        w.close()
    assert tight.stream_peak["pictures"] <= 6 and tight.stream_peak["flushes"] > 0
    assert set(w.unet) == {32}  # early calls are padded to the fixed size
    assert list(bounded) == [r.id for r in recs]
    for pid in bounded:
        assert np.array_equal(bounded[pid], unbounded[pid]), pid


def test_a_cpm_stream_under_a_tight_bound_gives_the_same_predictions(models, willow_root):
    """CPM pairs wait for their fresh pictures to fill whole VAE and DINOv2 calls; a bound
    tighter than one call forces early, padded VAE / DINOv2 calls instead: the predictions
    stay the same bit for bit, and only the calls change."""
    sd, dn = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=8)
    dino = DinoFeaturizer.from_pretrained(dn)
    cpm = make_prompt("cpm", feat, seed=2, dino_dim=dino.feature_dim)
    recs = willow(willow_root)
    recs = [recs[i] for i in np.random.default_rng(5).permutation(len(recs))[:24]]
    free = Batcher(feat, dino=dino, store=Store())
    gathered = run(feat, cpm, recs, willow_root, batcher=free)
    tight = Batcher(feat, dino=dino, store=Store())
    bounded = run(feat, cpm, recs, willow_root, batcher=tight, pending=4)
    assert free.stream_peak["flushes"] == 0 and tight.stream_peak["flushes"] > 0 and tight.stream_peak["pictures"] <= 4
    assert tight.padded["posterior"] > free.padded["posterior"] and tight.padded["dino"] > free.padded["dino"]
    assert len(tight.calls["dino"]) > len(free.calls["dino"])
    assert list(bounded) == list(gathered) == [r.id for r in recs]
    assert all(np.array_equal(bounded[k], gathered[k]) for k in gathered)


def test_dinov2_inputs_are_made_by_the_loader_threads(models, willow_root):
    """A CPM stream: each picture's DINOv2 crop (PIL resize and crop, normalisation) is made
    in a loader thread, ahead of the model, not in the thread that feeds the GPU; a store
    that already holds the tokens makes none."""
    import threading

    sd, dn = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=2)
    dino = DinoFeaturizer.from_pretrained(dn)
    cpm = make_prompt("cpm", feat, dino_dim=dino.feature_dim)
    recs = willow(willow_root, 30)
    made = []
    real = dino.pixels
    dino.pixels = lambda im: made.append(threading.current_thread().name) or real(im)
    store = Store()
    run(feat, cpm, recs, willow_root, batcher=Batcher(feat, dino=dino, store=store), workers=2)
    n_pics = len({p for r in recs for p in (r.src, r.trg)})
    assert len(made) >= n_pics and all(name.startswith("sd4match-load") for name in made), made
    made.clear()
    run(feat, cpm, recs, willow_root, batcher=Batcher(feat, dino=dino, store=store), workers=2)  # tokens stored: no DINOv2 input made
    assert made == []


def test_a_stored_run_decodes_no_picture(models, willow_root, tmp_path, monkeypatch):
    """With the maps on disk (``--cache-dir``), a rerun reads the pictures' files to name them
    but decodes none, and predicts the same."""
    from PIL import ImageFile

    sd, _ = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=2)
    recs = willow(willow_root, 40)
    prompt = resolve_prompt("empty", feat)
    decodes = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decodes.append(im.filename) or real_load(im))
    import sd4match.data as data

    real_decode, decoded = data.load_annotated_image, []
    monkeypatch.setattr(data, "load_annotated_image", lambda root, rel, size: decoded.append(rel) or real_decode(root, rel, size))
    first = run(feat, prompt, recs, willow_root, batcher=Batcher(feat, store=Store(folder=tmp_path / "cache")), workers=1)
    n_pics = len({p for r in recs for p in (r.src, r.trg)})
    assert len(set(decodes)) == n_pics
    assert sorted(decoded) == sorted({p for r in recs for p in (r.src, r.trg)})  # each picture decoded once, not once per pair
    decodes.clear()
    again = Batcher(feat, store=Store(folder=tmp_path / "cache"))  # a new process: nothing in memory
    second = run(feat, prompt, recs, willow_root, batcher=again)
    assert decodes == [] and again.calls["unet"] == [] and again.store.stats["features.disk"] == n_pics
    assert all(np.array_equal(first[k], second[k]) for k in first)
    decodes.clear()
    other = resolve_prompt("text", feat)  # another prompt: its maps are not stored, so its pictures are decoded (ahead, by the loaders)
    run(feat, other, recs, willow_root, batcher=Batcher(feat, store=Store(folder=tmp_path / "cache")))
    assert len(set(decodes)) == n_pics


def test_a_small_store_holds_its_byte_limit_through_an_evaluation(models, willow_root):
    """Maps evicted from a store too small for the split are recomputed (the same bits); the
    bytes the store's entries really hold never pass its limit."""
    sd, _ = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=2)
    recs = willow(willow_root, 60)
    prompt = resolve_prompt("empty", feat)
    roomy = run(feat, prompt, recs, willow_root)
    one_map = 32 * 8 * 8 * 4  # the tiny UNet's up_blocks[1]: 32 channels at 8 x 8, fp32
    small = Store(max_bytes=6 * one_map)
    held = []
    real = small._remember

    def remember(kind, key, tensors):
        real(kind, key, tensors)
        held.append(sum(t.untyped_storage().nbytes() for entry in small._mem.values() for t in entry.values()))

    small._remember = remember
    b = Batcher(feat, store=small)
    tight = run(feat, prompt, recs, willow_root, batcher=b, pending=4)  # pictures let go between their pairs: they come back evicted
    maps_made = (sum(b.calls["unet"]) - b.padded["unet"]) // feat.samples_per_picture
    assert max(held) <= small.max_bytes and maps_made > len({p for r in recs for p in (r.src, r.trg)})  # evictions happened: maps made again
    assert all(np.array_equal(tight[k], roomy[k]) for k in roomy)


@pytest.mark.parametrize("maps_held", [0, 1])
def test_a_store_too_small_for_a_pair_costs_recomputation_not_progress(models, willow_root, maps_held):
    """A store that cannot hold a pair's two maps (``--store-gb 0``, or one map's worth) used
    to send a stream round forever: each map computed, not kept, computed again. The stream
    keeps the maps it computed while a waiting pair holds their picture, so every pair is
    predicted (the same bits) with a bounded number of UNet calls."""
    sd, _ = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=2)
    recs = willow(willow_root, 30)
    prompt = resolve_prompt("empty", feat)
    roomy = run(feat, prompt, recs, willow_root)
    b = Batcher(feat, store=Store(max_bytes=maps_held * 32 * 8 * 8 * 4))
    calls, real = [], b.compute_maps

    def compute_maps(pics, embeds, ids):
        calls.append(len(pics))
        if len(calls) > 4 * len(recs):  # far more than one call per pair: going round, not forward
            raise RuntimeError("the stream recomputes maps without making progress")
        return real(pics, embeds, ids)

    b.compute_maps = compute_maps
    tight = run(feat, prompt, recs, willow_root, batcher=b)
    assert list(tight) == list(roomy) and all(np.array_equal(tight[k], roomy[k]) for k in roomy)
    assert len(calls) <= 2 * len(recs)


def test_training_runs_the_vae_at_most_once_per_picture(models, willow_root, tmp_path):
    from sd4match.train import Trainer, TrainConfig

    sd, dn = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=1)
    dino = DinoFeaturizer.from_pretrained(dn)
    cfg = TrainConfig(dataset="pfwillow", root=str(willow_root), prompt="cpm", model=str(sd), resolution=64, steps=15, batch_size=9, micro_batch=3,
                      val_every=0, device="cpu", train_split="test", val_split="test")
    t = Trainer(cfg, tmp_path / "run", featurizer=feat, dino=dino, progress=False)
    w = Work(feat, dino)
    try:
        for _ in range(15):
            t.train_step()
    finally:
        w.close()
    assert len(w.vae) == len(set(w.vae)) <= 50 and len(w.dino) == len(set(w.dino)) <= 50
    assert len(set(w.vae)) > 40  # 135 pairs drawn (270 pictures): nearly every one of the 50 was used, most several times
    assert set(w.unet) == {2 * 3}  # 3 pairs (6 pictures) a call


def test_store_bounds_memory_and_recovers_damaged_disk_entries(tmp_path):
    s = Store(max_bytes=3 * 4000, folder=tmp_path / "s")
    for i in range(5):
        s.put("features", f"k{i}", {"features": torch.full((1000,), float(i))})  # 4000 bytes each
    assert len(s) == 3 and s.nbytes == 12000
    assert s.get("features", "k4")["features"][0] == 4.0
    assert s.get("features", "k0")["features"][0] == 0.0 and s.stats["features.disk"] == 1  # evicted from memory, read from disk
    victim = s.path("features", "k1")
    victim.write_bytes(victim.read_bytes()[:50])
    s.clear_memory()
    assert s.get("features", "k1") is None  # damaged: absent, to be recomputed
    assert Store().get("features", "k2") is None  # memory only: nothing on disk


def test_dinov2_tokens_through_the_store_equal_direct(models, fixture_images):
    from PIL import Image

    dino = DinoFeaturizer.from_pretrained(models[1])
    pics = [Picture(Image.open(fixture_images / n).convert("RGB")) for n in ("cat.jpg", "owl.jpg", "cat.jpg")]
    f = Batcher(dino, dino=dino, store=Store())
    a = f.tokens(pics)
    b = f.tokens(pics)  # from the store
    assert torch.equal(a, b) and f.calls["dino"] == [16] and f.padded["dino"] == 14  # two distinct pictures in one call of 16
    assert torch.equal(a[0], dino.tokens([pics[0].image])[0]) and torch.equal(a[1], dino.tokens([pics[1].image])[0])  # = one picture a call


def test_the_profile_counts_kernels_by_what_they_do():
    """benchmarks/pipeline.py --profile: kernel names of the forms cuDNN, cuBLAS and PyTorch
    give their CUDA kernels, and CPU operator names, land in their categories; the implicit
    GEMMs of cuDNN convolutions count as convolution, not matmul."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pipeline import profile_category

    seen = {"sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off": "convolution",
            "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>(long, c10::BFloat16, c10::BFloat16 const*, float*, float*)": "GroupNorm",
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
            "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>": "attention",
            "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "matmul",
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas": "matmul",
            "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, (cudnnKernelDataType_t)0>": "layout copies",
            "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)::{lambda()#1}>": "elementwise",
            "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>": "LayerNorm",
            "aten::mkldnn_convolution": "convolution", "aten::native_group_norm": "GroupNorm", "aten::addmm": "matmul", "aten::copy_": "layout copies",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::upsample_nearest2d": "other",
            "triton_poi_fused_native_group_norm_silu_3": "Triton fusions", "triton_red_fused__to_copy_convolution_native_group_norm_7": "Triton fusions",
            "triton_tem_fused_mm_12": "matmul", "triton_tem_fused_convolution_4": "convolution",
            # the backward pass's: cuDNN's data gradient, FlashAttention's backward, GroupNorm's two reductions
            "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off": "convolution",
            "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8>, false, true>": "attention",
            "void at::native::(anonymous namespace)::ComputeInternalGradientsCUDAKernel<c10::BFloat16>(long, c10::BFloat16 const*, float*, float*)": "GroupNorm",
            "void at::native::(anonymous namespace)::ComputeBackwardFusedParamsCUDAKernel<c10::BFloat16>(long, long, long)": "GroupNorm",
            "aten::native_group_norm_backward": "GroupNorm", "aten::convolution_backward": "convolution"}
    assert {k: profile_category(k) for k in seen} == seen


def test_the_training_profile_splits_its_time_into_forward_backward_and_optimiser():
    """benchmarks/pipeline.py --profile-train: the time of what runs inside the autograd
    engine's backward nodes counts as backward, inside an optimiser's step as optimiser, the
    rest as forward. Checked on a step whose work is known to lie in one phase: matmuls that
    only a custom backward runs, or only the forward. The shares are wall times: on a busy
    machine a descheduled moment lands in whatever operator runs, so the heavy phase is made
    long beside such moments (about 0.1 s) and the best of three profiles is read."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pipeline import profile_shares

    a = torch.randn(512, 512)

    def heavy():  # about 8 GFLOP: a tenth of a second, where the rest of the step takes microseconds
        return sum(float((a @ a).sum()) for _ in range(32))

    class HeavyBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2 + 0 * heavy()

    w = torch.nn.Parameter(torch.ones(16))
    opt = torch.optim.Adam([w])

    def step(fwd, bwd):
        opt.zero_grad()
        if fwd:
            with torch.no_grad():
                heavy()
        (HeavyBackward.apply(w) if bwd else w * 2).sum().backward()
        opt.step()

    step(True, True)  # warm-up: Adam's state, first-call costs
    cpu = torch.device("cpu")
    backs = [profile_shares(lambda: step(False, True), cpu)["phases"] for _ in range(3)]
    fwds = [profile_shares(lambda: step(True, False), cpu)["phases"] for _ in range(3)]
    for ph in backs + fwds:
        assert set(ph) == {"forward and the rest", "backward", "optimiser"} and abs(sum(ph.values()) - 1) < 1e-9
        assert ph["optimiser"] > 0
    back = max(backs, key=lambda ph: ph["backward"])
    fwd = max(fwds, key=lambda ph: ph["forward and the rest"])
    assert back["backward"] > 0.7 and back["forward and the rest"] < 0.3
    assert fwd["forward and the rest"] > 0.7 and fwd["backward"] < 0.3


def test_a_target_counts_the_rows_of_its_own_unit_of_work():
    """benchmarks/gpu_table.py: a target's best row is the fastest plain or lever row of its
    unit of work; a lever's row of another unit (a training step beside a featurize target) and
    a compilation time never count."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_table import TARGETS, best, waiting

    assert waiting({"busy": 0.615, "syncs_per_step": 1}) == "; the GPU busy 62 % of the wall time; 1 synchronisations a step"
    assert waiting({"total_ms": 5.0}) == ""  # a CPU profile: nothing said about waiting

    work = {what: w for what, _, w in TARGETS}
    r = lambda v, u: {"value": v, "unit": u, "peak_mb": None}  # noqa: E731
    parts = {"eager": {"featurize new image, ensemble 8, batch 4, per image (ours)": r(30.0, "ms"),
                       "featurize new image, SD + DINOv2 fused, ensemble 8, batch 4, per image": r(5.0, "ms"),
                       "lever channels-last: featurize new image, ensemble 8, batch 4, per image": r(25.0, "ms"),
                       "lever channels-last: train step, cpm, batch 9, micro-batch 9 (posteriors stored)": r(0.015, "s"),
                       "train step, cpm, batch 9, micro-batch 9 (posteriors stored)": r(0.19, "s"),
                       "lever sdpa:cudnn": {"error": "attention 'cudnn': torch has no such kernel"}},
             "compiled": {"featurize new image, ensemble 8, batch 4, per image (ours)": r(21.0, "ms"),
                          "  first call incl. compilation, batch 4": r(0.002, "s"),
                          "evaluate, CPM prompt, per feature extraction (128)": r(32.1, "ms"),
                          "lever cpm-pairs 4 a UNet call: evaluate, CPM prompt, per feature extraction": r(30.5, "ms")}}
    assert best(parts, work["new picture, ensemble 8, batch 4"]) == (21.0, "featurize new image, ensemble 8, batch 4, per image (ours)", "compiled")
    assert best(parts, work["CPM evaluation, per extraction"])[:2] == (30.5, "lever cpm-pairs 4 a UNet call: evaluate, CPM prompt, per feature extraction")
    assert best(parts, work["training step, CPM, batch 9"]) == (15.0, "lever channels-last: train step, cpm, batch 9, micro-batch 9 (posteriors stored)", "eager")
    del parts["eager"]["lever channels-last: train step, cpm, batch 9, micro-batch 9 (posteriors stored)"], parts["eager"]["train step, cpm, batch 9, micro-batch 9 (posteriors stored)"]
    assert best(parts, work["training step, CPM, batch 9"]) is None


@pytest.mark.long
def test_pipeline_benchmark_runs_on_cpu_with_tiny_models(tmp_path):
    """benchmarks/pipeline.py --size tiny: every part runs end to end and reports its rows."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(script), "--size", "tiny", "--train-steps", "1", "--train-micro", "9", "--eval-pairs", "8", "--json", str(out),
                        "--levers", "sdpa:math,channels-last,cudnn-benchmark,channels-last@train,cpm-pairs:4,vae-batch:8,compile:fast,vae-batch:8@train",
                        "--profile", "4", "--profile-train", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "Projected SPair-71k test" in p.stdout and "Projected 30k training steps" in p.stdout
    assert res["evaluate_CPM_s_per_pair"] > 0 and res["train_cpm_9_s_per_step"] > 0
    for lever in ("lever sdpa math:", "lever channels-last:", "lever cudnn-benchmark:", "lever cpm-pairs 4 a UNet call:", "lever vae-batch 8:"):
        assert lever in p.stdout
    assert res["lever channels-last: train step, cpm, batch 9, micro-batch 9 (posteriors stored)"]["value"] > 0
    assert "lever vae-batch:8@train: not measured (lever vae-batch:8@train: only kernel levers" in p.stdout
    assert res["setup"]["kernels"] == {"channels_last": False, "attention": "auto", "cudnn_benchmark": False}  # the rows' defaults: a run's
    assert "lever compile:fast: not measured (compile_mode must be one of" in p.stdout  # a bad lever is said, the others run
    # the floor: FLOPs counted on meta copies of the loaded modules equal featurize.py's count on modules built on meta
    sys.path.insert(0, str(script.parent))
    from featurize import count_flops

    early, full, vae = count_flops("tiny", 64, str(tmp_path / "tok"))
    fl = res["flops"]
    assert (fl["unet_sample"], fl["unet_full_sample"], fl["vae_picture"]) == (early, full, vae)
    assert 1.5 < fl["unet_train_sample"] / fl["unet_sample"] < 3  # backward to the prompt: about one more forward of GEMMs
    row = res["floor featurize new image, ensemble 8, batch 4 (ours)"]
    assert row["tflop"] * 1e12 == vae + 8 * early and row["measured_ms"] == res["featurize_b4_ms"]
    assert "| featurize new image, ensemble 8, batch 4 (ours) |" in p.stdout and "measured / floor" in p.stdout
    # the profile: every CPU operator's self time counted once, in the categories of what the tiny UNet does
    prof = res["profile"]
    assert prof["pairs"] == 4 and abs(sum(prof["shares"].values()) - 1) < 1e-9
    assert {"convolution", "attention", "matmul", "GroupNorm"} <= set(prof["shares"]) and "Where a CPM evaluation of 4 pairs" in p.stdout
    from pipeline import profile_category

    top = [t["share"] for t in prof["top"]]
    assert top == sorted(top, reverse=True) and 0 < sum(top) <= 1 + 1e-9 and all(t["category"] == profile_category(t["name"]) for t in prof["top"])
    assert prof["phases"]["backward"] == 0 and prof["phases"]["optimiser"] == 0  # an evaluation runs no backward and no optimiser
    # the training profile: one CPM step at micro-batch 9, its backward and its Adam step seen
    pt = res["profile_train"]
    assert (pt["steps"], pt["micro_batch"]) == (1, 9) and abs(sum(pt["shares"].values()) - 1) < 1e-9
    assert pt["phases"]["backward"] > 0 and pt["phases"]["optimiser"] > 0 and abs(sum(pt["phases"].values()) - 1) < 1e-9
    assert "Where a CPM training step (batch 9, micro-batch 9; 1 steps)" in p.stdout and "By phase: forward and the rest" in p.stdout
    # a spent budget: no part or lever starts, and the floor and the JSON still come
    out2 = tmp_path / "spent.json"
    p = subprocess.run([sys.executable, str(script), "--size", "tiny", "--budget-s", "0.001", "--levers", "sdpa:math", "--json", str(out2)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out2.read_text())
    assert {k for k in res if k.startswith("not measured: ")} == {f"not measured: {k}" for k in ("stages", "featurize", "evaluate", "sweep", "train", "lever sdpa:math")}
    assert res["flops"] == fl and "lever sdpa math:" not in p.stdout and "measured / floor" in p.stdout


@pytest.mark.long
def test_the_prepared_gpu_run_runs_its_eager_part_on_the_tiny_models(tmp_path):
    """benchmarks/gpu.sh, the GPU run prepared for a lent machine, checked here on the tiny
    models (SIZE=tiny DEVICE=cpu): its eager part writes its JSON and log with every lever's
    row (or why not) and the profile; an unknown part is refused before anything runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    env = {**os.environ, "SIZE": "tiny", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "PART_LIMIT_S": "100000",  # no budget or timeout of the script's own can end a part on a slow machine: no timing in this test
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 is this test's interpreter
    p = subprocess.run(["bash", str(script), "eager", "compiled-nope"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown part 'compiled-nope'" in p.stderr and not (tmp_path / "out").exists()
    p = subprocess.run(["bash", str(script), "eager"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    res = json.loads((tmp_path / "out" / "eager.json").read_text())
    for lever in ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "channels-last", "cudnn-benchmark", "cpm-pairs:4", "vae-batch:8"):  # measured, or said why not
        assert any(k.startswith("lever " + lever.replace(":", " ")) for k in res) or "error" in res[f"lever {lever}"], lever
    for lever in ("cudnn-benchmark", "channels-last"):  # on the training step too
        assert res[f"lever {lever}: train step, cpm, batch 9, micro-batch 9 (posteriors stored)"]["value"] > 0
    assert res["profile"]["shares"] and res["train_cpm_9_s_per_step"] > 0 and res["setup"]["size"] == "tiny"
    assert res["profile_train"]["steps"] == 2 and res["profile_train"]["phases"]["backward"] > 0
    log = (tmp_path / "out" / "eager.log").read_text()
    assert "measured / floor" in log and "Where a CPM evaluation" in log and "Where a CPM training step" in log and "| measurement | value | peak MB |" in log
    # gpu_table.py: the RESULTS.md tables from the parts' JSONs; a part that did not run is named, not filled in
    table = subprocess.run([sys.executable, str(script.parent / "gpu_table.py"), str(tmp_path / "out" / "eager.json"), str(tmp_path / "out" / "compiled.json")],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr[-2000:]
    t = table.stdout
    assert "compiled.json is missing: not measured" in t and "| measurement | eager |" in t
    assert "Profile (eager, CPM training, batch 9, micro-batch 9, 2 steps" in t and "; by phase: forward and the rest" in t
    b4 = res["featurize new image, ensemble 8, batch 4, per image (ours)"]["value"]
    best_b4 = min([b4] + [v["value"] for k, v in res.items() if k.startswith("lever ") and k.endswith(": featurize new image, ensemble 8, batch 4, per image")
                          and "value" in v])
    assert f"| new picture, ensemble 8, batch 4 | {best_b4:.1f} ms |" in t and "| ≤ 20 ms | (tiny) |" in t
    steps = [(res[f"train_cpm_{m}_s_per_step"], f"train step, cpm, batch 9, micro-batch {m} (posteriors stored)") for m in (3, 9)]
    steps += [(v["value"], k) for k, v in res.items() if k.startswith("lever ") and ": train step, cpm, batch 9, " in k]  # a lever's row counts too
    step, name = min(steps)
    assert f"| training step, CPM, batch 9 | {1000 * step:.1f} ms | {name} (eager) |" in t
    for lever in ("sdpa:efficient", "sdpa:cudnn"):  # what this CPU lacks: the reason, in its row
        assert f"| lever {lever} | not measured ({res[f'lever {lever}']['error'][:80]}) |" in t if f"lever {lever}" in res else f"lever {lever.replace(':', ' ')}:" in t


def _willow_pictures(root, n):
    from sd4match.data import load_pair_images

    pics = []
    for r in willow(root):
        for im in load_pair_images(root, r):
            p = Picture(im)
            if p.key not in {q.key for q in pics}:
                pics.append(p)
        if len(pics) >= n:
            return pics[:n]
    return pics


def test_batched_vae_and_dinov2_equal_one_picture_a_call(models, willow_root):
    """Fixed-size VAE and DINOv2 calls (fp32, CPU): a picture's posterior and tokens are the
    same bits alone in its call (padded) as with any other pictures; with ``vae_batch=1``
    they are those of the VAE run one picture a call, unpadded, under the keys stored before
    calls were batched."""
    from sd4match.store import settings_key

    sd, dn = models
    feat = SDFeaturizer.from_pretrained(sd, resolution=64)
    dino = DinoFeaturizer.from_pretrained(dn)
    pics = _willow_pictures(willow_root, 8)
    together = Batcher(feat, dino=dino, store=Store())
    mean, std = together.posteriors(pics)
    tokens = together.tokens(pics)
    assert together.calls == {"posterior": [8], "unet": [], "dino": [16]} and together.padded == {"dino": 8}
    split = Batcher(feat, dino=dino, store=Store())  # 3 then 5: other companions, other padding
    m3, _ = split.posteriors(pics[:3])
    m5, _ = split.posteriors(pics[3:])
    assert torch.equal(torch.cat([m3, m5]), mean) and split.padded["posterior"] == 5 + 3
    for i, p in enumerate(pics):
        alone = Batcher(feat, dino=dino, store=Store())
        m, s = alone.posteriors([p])
        assert torch.equal(m, mean[i : i + 1]) and torch.equal(s, std[i : i + 1])
        assert torch.equal(alone.tokens([p]), tokens[i : i + 1])
        assert alone.calls["posterior"] == [8] and alone.padded["posterior"] == 7
    # against the models called one picture at a time, unpadded: DINOv2's kernels give the same
    # bits; the VAE's convolutions take another oneDNN kernel at batch 1 (float noise)
    x = torch.stack([p.tensor(64, "cpu") for p in pics])
    direct = torch.cat([feat.posterior(x[i : i + 1])[0] for i in range(8)])
    torch.testing.assert_close(mean, direct, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, torch.cat([dino.tokens([p.image]) for p in pics]))
    cpm = make_prompt("cpm", feat, dino_dim=dino.feature_dim)
    batched_key, batched_cpm = together.feature_key(pics[0], together.prompt_id(None)), together.prompt_id(cpm)
    # vae_batch=1: one picture a call, the old bits under the old keys
    feat.reconfigure(vae_batch=1)
    old = Batcher(feat, dino=dino, store=Store(), dino_batch=1)
    assert torch.equal(old.posteriors(pics)[0], direct) and old.calls["posterior"] == [1] * 8 and not old.padded
    pid = old.prompt_id(None)
    assert old.feature_key(pics[0], pid) == settings_key(pics[0].key, {"featurizer": feat.settings(), "prompt": pid, "seed": 0})
    assert batched_key != old.feature_key(pics[0], pid)  # maps made from batched posteriors are other bits: other keys
    assert old.prompt_id(cpm).endswith(":-") and batched_cpm == old.prompt_id(cpm) + ":dino-call-16"
