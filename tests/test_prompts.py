"""Prompts: the text-encoder bridge, CPM shapes by hand, save/load, and what a step may change."""

import pytest
import torch

from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer
from sd4match.features.dino import DinoFeaturizer
from sd4match.loss import gaussian_window_ce
from sd4match.matching import point_correlation
from sd4match.prompts import ConditionalPrompt, TextEncoderBridge, bridge_for, load_prompt, make_prompt
from sd4match.testing import tiny_clip_tokenizer, tiny_dinov2, tiny_sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"sd2": tiny_sd(d / "sd2"), "sd1": tiny_sd(d / "sd1", style="sd1"), "dino": tiny_dinov2(d / "dino")}


@pytest.fixture(scope="module")
def feat(models):
    return SDFeaturizer.from_pretrained(models["sd2"], resolution=64, ensemble=1)


def batch_for(n=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"categories": ["cat", "dog"][:n], "dino_src": torch.randn(n, 256, dim, generator=g), "dino_trg": torch.randn(n, 256, dim, generator=g)}


def test_bridge_with_real_token_embeddings_equals_text_encoding(feat):
    b = bridge_for(feat)
    ids = feat.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    tokens = feat.text_encoder.get_input_embeddings()(ids)[:, 1:76]  # what sits between BOS and the last EOS
    torch.testing.assert_close(b.encode_tokens(tokens), feat.encode_text(["a photo of a cat"]), rtol=0, atol=0)


def test_cpm_shapes_and_count_for_dinov2_b_and_sd21_widths(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    # a 1024-d text encoder (SD 2.1's width) built from config with random weights
    te = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
                                      max_position_embeddings=77, bos_token_id=512, eos_token_id=513))
    bridge = TextEncoderBridge(te, tiny_clip_tokenizer(tmp_path / "tok"))
    cpm = ConditionalPrompt(bridge, dino_dim=768)
    shapes = {k: tuple(v.shape) for k, v in cpm.named_parameters()}
    assert shapes == {
        "global_tokens": (1, 25, 1024),
        "proj.weight": (1024, 1536), "proj.bias": (1024,),
        "mix.weight": (256, 256), "mix.bias": (256,),
        "pos": (1, 50, 1024),
        "gate": (1,),
    }
    # by hand: 25*1024 + (1536*1024 + 1024) + (256*256 + 256) + 50*1024 + 1
    assert sum(p.numel() for p in cpm.parameters()) == 25_600 + 1_573_888 + 65_792 + 51_200 + 1 == 1_716_481
    out = cpm({"dino_src": torch.randn(2, 256, 768), "dino_trg": torch.randn(2, 256, 768)})
    assert out.shape == (2, 77, 1024)


@pytest.mark.parametrize("kind", ["text", "empty", "single", "category", "cpm"])
def test_save_load_round_trip_is_bit_exact(kind, feat, tmp_path):
    kw = {"dino_dim": 32} if kind == "cpm" else {}
    p = make_prompt(kind, feat, categories=["dog", "cat"], seed=3, **kw)
    with torch.no_grad():  # move the weights away from their initialisation
        for prm in p.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    batch = batch_for()
    before = p(batch)
    folder = p.save(tmp_path / kind, step=7)
    q = load_prompt(folder, feat)
    assert type(q) is type(p) and q.config == p.config and q.config.training == {"step": 7}
    for (k, a), (_, b) in zip(p.state_dict().items(), q.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(q(batch), before)


def test_load_refuses_other_text_width(feat, models, tmp_path):
    p = make_prompt("single", feat)
    p.save(tmp_path / "p")
    sd1 = SDFeaturizer.from_pretrained(models["sd1"])
    with pytest.raises(Sd4MatchError, match=r"made for a 32-d text encoder .* has a 24-d one"):
        load_prompt(tmp_path / "p", sd1)


def test_load_errors(feat, tmp_path):
    with pytest.raises(Sd4MatchError, match="not a prompt folder"):
        load_prompt(tmp_path, feat)
    folder = make_prompt("single", feat).save(tmp_path / "p")
    w = folder / "prompt.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(Sd4MatchError, match=r"prompt\.safetensors: cannot read prompt weights"):
        load_prompt(folder, feat)


def test_category_prompt_errors(feat):
    p = make_prompt("category", feat, categories=["cat"])
    with pytest.raises(Sd4MatchError, match="category 'bus' has no learned prompt"):
        p({"categories": ["bus"]})
    with pytest.raises(Sd4MatchError, match="needs the DINOv2 tokens"):
        make_prompt("cpm", feat, dino_dim=32)({"categories": ["cat"]})
    with pytest.raises(Sd4MatchError, match="unknown prompt kind"):
        make_prompt("CPM", feat)


def test_one_step_changes_only_prompt_parameters(models):
    feat = SDFeaturizer.from_pretrained(models["sd2"], resolution=64, ensemble=1)
    dino = DinoFeaturizer.from_pretrained(models["dino"])
    prompt = make_prompt("cpm", feat, dino_dim=dino.feature_dim)
    with torch.no_grad():
        prompt.gate.fill_(0.5)  # open the gate so every CPM parameter gets a gradient
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
              (("unet", feat.unet), ("vae", feat.vae), ("text_encoder", feat.text_encoder), ("dino", dino.model))}
    start = {k: v.clone() for k, v in prompt.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    src, trg = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    batch = {"dino_src": dino.tokens(src), "dino_trg": dino.tokens(trg)}
    opt = torch.optim.Adam([{"params": [prompt.global_tokens, prompt.pos, prompt.gate], "lr": 1e-2},
                            {"params": prompt.linear_parameters(), "lr": 1e-3}])
    emb = prompt(batch)
    fs = feat(src, prompt_embeds=emb, generator=torch.Generator().manual_seed(1))
    ft = feat(trg, prompt_embeds=emb, generator=torch.Generator().manual_seed(2))
    kps = torch.tensor([[[1.5, 2.5], [5.5, 6.5]], [[3.2, 3.7], [7.1, 0.4]]])
    loss = gaussian_window_ce(point_correlation(fs, ft, kps), kps.flip(-1))
    loss.backward()
    opt.step()
    for name, sd in frozen.items():
        module = {"unet": feat.unet, "vae": feat.vae, "text_encoder": feat.text_encoder, "dino": dino.model}[name]
        for k, v in module.state_dict().items():
            assert torch.equal(v, sd[k]), f"{name}.{k} changed"
    changed = [k for k, v in prompt.state_dict().items() if not torch.equal(v, start[k])]
    assert sorted(changed) == sorted(start)  # every prompt parameter moved


def test_dino_tokens_and_cell_map(models):
    from PIL import Image

    dino = DinoFeaturizer.from_pretrained(models["dino"])
    ims = [Image.new("RGB", (400, 300), (10, 200, 30)), Image.new("RGB", (300, 300), (0, 0, 0))]
    assert dino.tokens(ims).shape == (2, 256, 32)
    assert dino(ims).shape == (2, 32, 16, 16)
    # 400 x 300: shorter side to 256 -> 341 x 256, crop 224 from left (341 - 224) // 2 = 58, top 16
    cm = dino.cell_map((400, 300))
    x = (58 + 112) * 400 / 341  # the crop's centre column in original pixels
    y = (16 + 112) * 300 / 256
    assert cm.pixel_to_cell([[x, y]])[0].tolist() == pytest.approx([8.0, 8.0])
    assert cm.cell_to_pixel(cm.pixel_to_cell([[123.0, 45.0]]))[0].tolist() == pytest.approx([123.0, 45.0])


def test_dino_offline_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(Sd4MatchError, match=r"DINOv2 weights facebook/dinov2-base \(dinov2-b\) are not in the local cache.*hf download facebook/dinov2-base"):
        DinoFeaturizer.from_pretrained("dinov2-b", local_files_only=True)
