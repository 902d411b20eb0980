"""Prompts: the text-encoder bridge, CPM shapes by hand, save/load, and what a step may change."""

import math

import pytest
import torch

from sd4match.errors import Sd4MatchError
from sd4match.features import SDFeaturizer
from sd4match.features.dino import DinoFeaturizer
from sd4match.loss import gaussian_window_ce
from sd4match.matching import point_correlation
from sd4match.prompts import ConditionalPrompt, TextEncoderBridge, bridge_for, load_prompt, make_prompt, prompt_fingerprint
from sd4match.prompts.official import CPM_KEYS
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


def clip_by_hand(te, seq):
    """CLIP's causal transformer + final LayerNorm on an embedding-layer sequence, written out
    from the encoder layers (the official code's ``token_embeds`` path), no position added."""
    model = getattr(te, "text_model", te)
    x = seq
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for layer in model.encoder.layers:
        a = layer.self_attn
        hdim = a.head_dim
        y = layer.layer_norm1(x)
        q, k, v = (proj(y).view(x.shape[0], n, -1, hdim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        att = torch.softmax(q @ k.transpose(-1, -2) * hdim**-0.5 + mask, dim=-1)
        x = x + a.out_proj((att @ v).transpose(1, 2).reshape(x.shape[0], n, -1))
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.final_layer_norm(x)


def emb_layer(feat):
    return getattr(feat.text_encoder, "text_model", feat.text_encoder).embeddings


def test_single_prompt_of_real_token_rows_equals_the_text_encoding(feat):
    """A Single prompt whose learned rows are the embedding-layer outputs of real token ids
    (at positions 1 ... 75) gives exactly the plain text encoding of those ids."""
    tok = feat.tokenizer
    ids = torch.randint(0, 500, (1, 75), generator=torch.Generator().manual_seed(0))
    full = torch.cat([torch.tensor([[tok.bos_token_id]]), ids, torch.tensor([[tok.eos_token_id]])], dim=1)  # 77 ids, no padding
    with torch.no_grad():
        rows = emb_layer(feat)(input_ids=full)
        plain = feat.text_encoder(full)[0]
    p = make_prompt("single", feat)
    with torch.no_grad():
        p.tokens.copy_(rows[:, 1:76])
        torch.testing.assert_close(p(), plain, rtol=0, atol=0)
        # and the official token_embeds path, written out by hand, agrees
        torch.testing.assert_close(clip_by_hand(feat.text_encoder, rows), plain, rtol=1e-5, atol=1e-5)


def test_learned_rows_get_no_position_embedding_again(feat):
    p = make_prompt("single", feat, seed=4)
    layer = emb_layer(feat)
    with torch.no_grad():
        seq = torch.cat([p.ends[:, :1], p.tokens, p.ends[:, 1:]], dim=1)
        torch.testing.assert_close(p(), clip_by_hand(feat.text_encoder, seq), rtol=1e-5, atol=1e-5)
        # the initial rows are embedding-layer outputs (token + position) of vocabulary ids
        pos = layer.position_embedding.weight[1:76]
        tok_rows = p.tokens[0] - pos
        dist = torch.cdist(tok_rows, layer.token_embedding.weight)
        assert dist.min(dim=1).values.max().item() < 1e-4  # (cdist rounding)
        # BOS at position 0 and EOS at position 76
        ends = layer(input_ids=torch.tensor([[feat.tokenizer.bos_token_id] + [0] * 75 + [feat.tokenizer.eos_token_id]]))
        torch.testing.assert_close(p.ends, ends[:, [0, 76]])


def test_cpm_by_hand_with_official_inits_and_gate(feat):
    torch.manual_seed(123)
    cpm = make_prompt("cpm", feat, dino_dim=8, n_patches=12, n_global=3, n_cond=4, seed=5)
    d = feat.prompt_dim
    shapes = {k: tuple(v.shape) for k, v in cpm.named_parameters()}
    assert shapes == {"global_embeds": (1, 3, d), "positional_embedding": (1, 4, d), "alpha_cond": (1, 4, d),
                      "linear_C.weight": (d, 16), "linear_C.bias": (d,), "linear_N.weight": (12, 12), "linear_N.bias": (12,)}
    for name in ("global_embeds", "positional_embedding", "alpha_cond"):  # U[0, 1)
        v = getattr(cpm, name)
        assert 0 <= v.min().item() and v.max().item() < 1 and v.std().item() > 0.2
    bound = 1 / math.sqrt(16)  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert cpm.linear_C.weight.abs().max().item() <= bound and cpm.linear_C.weight.abs().max().item() > 0.8 * bound
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    # by hand: concat channels -> linear_C -> linear_N over patches -> max-pool 12 -> 4 -> + pos -> x tanh(alpha)
    x = torch.cat([s, t], -1) @ cpm.linear_C.weight.T + cpm.linear_C.bias  # (2, 12, d)
    x = (x.transpose(1, 2) @ cpm.linear_N.weight.T + cpm.linear_N.bias).transpose(1, 2)  # (2, 12, d)
    pooled = torch.stack([x[:, i * 3 : (i + 1) * 3].amax(dim=1) for i in range(4)], dim=1)  # 12 patches into 4 bins of 3
    cond = torch.tanh(cpm.alpha_cond) * (pooled + cpm.positional_embedding)
    with torch.no_grad():
        template = emb_layer(feat)(input_ids=torch.tensor([[feat.tokenizer.bos_token_id] + [0] * 7 + [feat.tokenizer.eos_token_id] + [0] * 68]))
        seq = torch.cat([template[:, :1].expand(2, -1, -1), cpm.global_embeds.expand(2, -1, -1), cond, template[:, 8:].expand(2, -1, -1)], dim=1)
        want = clip_by_hand(feat.text_encoder, seq)
        torch.testing.assert_close(cpm({"dino_src": s, "dino_trg": t}), want, rtol=1e-5, atol=1e-5)
    # the element-wise gate: every conditional row and channel has its own gate
    cpm2 = make_prompt("cpm", feat, dino_dim=8, n_patches=12, n_global=3, n_cond=4, seed=5)
    with torch.no_grad():
        cpm2.alpha_cond[0, 2, 0] = 0.0  # close one entry only
        out2 = cpm2({"dino_src": s, "dino_trg": t})
    assert not torch.equal(out2, cpm({"dino_src": s, "dino_trg": t}).detach())


def test_cpm_shapes_and_count_for_dinov2_b_and_sd21_widths(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    # a 1024-d text encoder (SD 2.1's width) built from config with random weights
    te = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
                                      max_position_embeddings=77, bos_token_id=512, eos_token_id=513))
    bridge = TextEncoderBridge(te, tiny_clip_tokenizer(tmp_path / "tok"))
    cpm = ConditionalPrompt(bridge, dino_dim=768)
    shapes = {k: tuple(v.shape) for k, v in cpm.named_parameters()}
    assert shapes == {
        "global_embeds": (1, 25, 1024), "positional_embedding": (1, 50, 1024), "alpha_cond": (1, 50, 1024),
        "linear_C.weight": (1024, 1536), "linear_C.bias": (1024,),
        "linear_N.weight": (256, 256), "linear_N.bias": (256,),
    }
    # by hand: 25*1024 + 50*1024 + 50*1024 + (1536*1024 + 1024) + (256*256 + 256)
    assert sum(p.numel() for p in cpm.parameters()) == 25_600 + 51_200 + 51_200 + 1_573_888 + 65_792 == 1_767_680
    out = cpm({"dino_src": torch.randn(2, 256, 768), "dino_trg": torch.randn(2, 256, 768)})
    assert out.shape == (2, 77, 1024)


def test_text_prompt_words_pfwillow_subclasses_as_the_official_code(feat):
    from sd4match.prompts import TextPrompt

    t = TextPrompt(bridge_for(feat))
    for sub, word in (("car(G)", "car"), ("duck(S)", "duck"), ("motorbike(M)", "motorbike"), ("winebottle(wC)", "winebottle"), ("cat", "cat")):
        torch.testing.assert_close(t({"categories": [sub]}), feat.encode_text([f"a photo of a {word}"]), rtol=0, atol=0)


def test_text_prompt_words_underscored_names_with_spaces_and_stores_maps_by_that_text(feat):
    """CUB's and MP-100's names are underscored (``Black_footed_Albatross``, ``giraffe_body``):
    CLIP read the underscores. They are spaces now, and a text prompt's stored maps are named
    by the text written, so maps of another wording (an earlier release's) are never handed
    back, and sub-classes worded alike share one map."""
    from sd4match.batching import Batcher
    from sd4match.prompts import TextPrompt
    from sd4match.store import Store

    t = TextPrompt(bridge_for(feat))
    for name, words in (("Black_footed_Albatross", "Black footed Albatross"), ("giraffe_body", "giraffe body"), ("human_face", "human face")):
        torch.testing.assert_close(t({"categories": [name]}), feat.encode_text([f"a photo of a {words}"]), rtol=0, atol=0)
    b = Batcher(feat, store=Store())
    assert b.prompt_id(t, "car(G)") == b.prompt_id(t, "car(S)") != b.prompt_id(t, "duck(S)")
    assert b.prompt_id(t, "giraffe_body") == b.prompt_id(t, "giraffe body")

    class Underscored(TextPrompt):  # the wording before: the name as it is
        def text_for(self, category):
            return self.template.format(category=category or "")

    old = Underscored(bridge_for(feat))
    assert prompt_fingerprint(old) == prompt_fingerprint(t) and b.prompt_id(old, "giraffe_body") != b.prompt_id(t, "giraffe_body")
    assert b.prompt_id(old, "cat") == b.prompt_id(t, "cat")  # a name without underscores is the same text: the same map
    # a template without {category} writes one text for every category: one map
    fixed = TextPrompt(bridge_for(feat), "a photo")
    assert b.prompt_id(fixed, "cat") == b.prompt_id(fixed, "dog")


def test_category_prompt_from_pfpascal_serves_pfwillow_subclasses(feat):
    p = make_prompt("category", feat, categories=["bird", "bottle", "car", "motorbike"])
    with torch.no_grad():
        for sub, cls in (("duck(S)", "bird"), ("winebottle(wC)", "bottle"), ("car(G)", "car"), ("motorbike(M)", "motorbike")):
            torch.testing.assert_close(p({"categories": [sub]}), p({"categories": [cls]}), rtol=0, atol=0)


def test_old_format_prompt_folders_are_refused(feat, tmp_path):
    import json

    folder = make_prompt("single", feat).save(tmp_path / "p")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format"] = "sd4match-prompt-1"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Sd4MatchError, match=r"config\.json: prompt format 'sd4match-prompt-1' is from an older sd4match"):
        load_prompt(folder, feat)


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
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
              (("unet", feat.unet), ("vae", feat.vae), ("text_encoder", feat.text_encoder), ("dino", dino.model))}
    start = {k: v.clone() for k, v in prompt.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    src, trg = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    batch = {"dino_src": dino.tokens(src), "dino_trg": dino.tokens(trg)}
    opt = torch.optim.Adam([{"params": [prompt.global_embeds, prompt.positional_embedding, prompt.alpha_cond], "lr": 1e-2},
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
    assert cm.pixel_to_cell([[x, y]])[0].tolist() == pytest.approx([7.5, 7.5])  # between patches 7 and 8 (patch i centred at i)
    assert cm.cell_to_pixel(cm.pixel_to_cell([[123.0, 45.0]]))[0].tolist() == pytest.approx([123.0, 45.0])


@pytest.mark.parametrize("size,resized,offset", [((500, 332), (385, 256), (80, 16)), ((366, 500), (256, 349), (16, 62)), ((400, 300), (341, 256), (58, 16))])
def test_dino_crop_resizes_as_the_image_processor(models, size, resized, offset):
    """transformers' image processor (the authors' 4.35): shorter side 256, the other
    int(256 * long / short), truncated (500 x 332 -> 385, not round's 386; 366 x 500 -> 349,
    not 350), bicubic; centre crop 224 at ((w - 224) // 2, (h - 224) // 2)."""
    import numpy as np
    from PIL import Image

    assert resized == ((256, int(256 * size[1] / size[0])) if size[0] <= size[1] else (int(256 * size[0] / size[1]), 256))
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    dino = DinoFeaturizer.from_pretrained(models["dino"])
    l, t = offset
    want = np.asarray(im.resize(resized, Image.Resampling.BICUBIC).crop((l, t, l + 224, t + 224)), dtype=np.float32) / 255
    want = (torch.from_numpy(want).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(dino.preprocess([im])[0], want, rtol=0, atol=1e-6)
    # the cell map follows the same crop: the crop's centre lies between patches 7 and 8
    cx, cy = (l + 112) * size[0] / resized[0], (t + 112) * size[1] / resized[1]
    assert dino.cell_map(size).pixel_to_cell([[cx, cy]])[0].tolist() == pytest.approx([7.5, 7.5])


def test_dino_position_embeddings_as_the_authors_transformers(models):
    """A tiny DINOv2 with the real model's 37 x 37 position grid at 224 input (16 x 16
    patches): ``official`` tokens equal the old interpolation computed another way
    (conftest.official_dino_hidden); ``transformers`` equals the installed model's own call;
    the two differ; no hook is left on the model."""
    from conftest import official_dino_hidden
    from PIL import Image

    ims = [Image.new("RGB", (400, 300), (10, 200, 30)), Image.new("RGB", (333, 500), (120, 5, 77))]
    off = DinoFeaturizer.from_pretrained(models["dino"])
    new = DinoFeaturizer.from_pretrained(models["dino"], pos="transformers")
    assert off.model.config.image_size == 518 and off.model.embeddings.position_embeddings.shape[1] == 1 + 37 * 37
    px = off.preprocess(ims)
    torch.testing.assert_close(off.tokens(ims), official_dino_hidden(off.model, px)[:, 1:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(new.tokens(ims), new.model(pixel_values=px).last_hidden_state[:, 1:], rtol=0, atol=0)
    assert (off.tokens(ims) - new.tokens(ims)).abs().max() > 1e-3
    assert not off.model.embeddings._forward_hooks
    assert off.settings()["pos"] == "official" and new.settings()["pos"] == "transformers"
    with pytest.raises(Sd4MatchError, match="position embeddings"):
        DinoFeaturizer.from_pretrained(models["dino"], pos="bicubic")


def test_dino_offline_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(Sd4MatchError, match=r"DINOv2 weights facebook/dinov2-base \(dinov2-b\) are not in the local cache.*hf download facebook/dinov2-base") as e:
        DinoFeaturizer.from_pretrained("dinov2-b", local_files_only=True)
    # the way round it names DINOv2's own format and flag, not a diffusers folder as --model
    assert str(e.value).endswith("or pass a local transformers folder of it (config.json, model.safetensors) as --dino (a CPM prompt's DINOv2), or in --model")


# ---------------------------------------------------------------------------- the authors' released files
def official_sequence(feat, seed):
    """What the official code saves for one Single/Class prompt: [BOS, 75 learned rows, EOS]
    embedding-layer rows, (1, 77, D); the learned rows here are random."""
    tok = feat.tokenizer
    with torch.no_grad():
        rows = emb_layer(feat)(input_ids=torch.tensor([[tok.bos_token_id] + [0] * 75 + [tok.eos_token_id]]))
    learned = torch.randn(1, 75, feat.prompt_dim, generator=torch.Generator().manual_seed(seed)) * 0.1
    return torch.cat([rows[:, :1], learned, rows[:, 76:]], dim=1)


def official_cpm_state(feat, dino_dim=32, n_patches=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = feat.prompt_dim
    return {"global_embeds": torch.rand(1, 25, d, generator=g), "positional_embedding": torch.rand(1, 50, d, generator=g),
            "alpha_cond": torch.rand(1, 50, d, generator=g), "linear_C.weight": torch.randn(d, 2 * dino_dim, generator=g) * 0.05,
            "linear_C.bias": torch.randn(d, generator=g) * 0.05, "linear_N.weight": torch.randn(n_patches, n_patches, generator=g) * 0.05,
            "linear_N.bias": torch.randn(n_patches, generator=g) * 0.05}


def official_cpm_by_hand(feat, sd, s, t):
    """The official HybridCaptioner (Pair, DINO, Feat) + token_embeds path, written out here."""
    x = torch.cat([s, t], dim=2) @ sd["linear_C.weight"].T + sd["linear_C.bias"]
    x = (x.permute(0, 2, 1) @ sd["linear_N.weight"].T + sd["linear_N.bias"]).permute(0, 2, 1)  # (B, 256, D)
    x = torch.nn.functional.adaptive_max_pool1d(x.permute(0, 2, 1), 50).permute(0, 2, 1)
    cond = torch.tanh(sd["alpha_cond"]) * (sd["positional_embedding"] + x)
    tok = feat.tokenizer
    with torch.no_grad():
        dummy = emb_layer(feat)(input_ids=torch.tensor([[tok.bos_token_id] + [7] * 75 + [tok.eos_token_id]]))
    b = s.shape[0]
    seq = torch.cat([dummy[:, :1].expand(b, -1, -1), sd["global_embeds"].expand(b, -1, -1), cond, dummy[:, 76:].expand(b, -1, -1)], dim=1)
    return clip_by_hand(feat.text_encoder, seq)


def test_import_single_class_and_cpm_through_the_cli(feat, models, tmp_path, capsys):
    from sd4match.cli import main
    from sd4match.fileio import file_sha256

    model_args = ["--model", str(models["sd2"]), "--device", "cpu"]
    single = {"dataset": official_sequence(feat, 1)}
    torch.save(single, tmp_path / "caption_single.pt")
    classes = {"car": official_sequence(feat, 2), "bird": official_sequence(feat, 3), "bottle": official_sequence(feat, 4)}
    torch.save(classes, tmp_path / "caption_class.pt")
    cpm_sd = official_cpm_state(feat)
    torch.save(cpm_sd, tmp_path / "ckpt.pt")

    assert main(["prompts", "import", str(tmp_path / "caption_single.pt"), "--kind", "single", "--out", str(tmp_path / "single"), *model_args]) == 0
    assert main(["prompts", "import", str(tmp_path / "caption_class.pt"), "--kind", "category", "--out", str(tmp_path / "class"), *model_args]) == 0
    assert main(["prompts", "import", str(tmp_path / "ckpt.pt"), "--kind", "cpm", "--dino", str(models["dino"]), "--out", str(tmp_path / "cpm"),
                 *model_args]) == 0
    shown = capsys.readouterr().out
    assert "cpm prompt (sd4match-prompt-2)" in shown and "25 global + 50 conditional rows" in shown

    with torch.no_grad():
        p = load_prompt(tmp_path / "single", feat)
        torch.testing.assert_close(p({}), clip_by_hand(feat.text_encoder, single["dataset"]), rtol=1e-5, atol=1e-5)
        assert p.config.training["imported_from"]["sha256"] == file_sha256(tmp_path / "caption_single.pt")
        c = load_prompt(tmp_path / "class", feat)
        assert c.config.categories == ["bird", "bottle", "car"]
        for cat, seq in classes.items():
            torch.testing.assert_close(c({"categories": [cat]}), clip_by_hand(feat.text_encoder, seq), rtol=1e-5, atol=1e-5)
        # a PF-Willow sub-class uses its PF-Pascal class's prompt (duck -> bird)
        torch.testing.assert_close(c({"categories": ["duck(S)"]}), clip_by_hand(feat.text_encoder, classes["bird"]), rtol=1e-5, atol=1e-5)
        m = load_prompt(tmp_path / "cpm", feat)
        g = torch.Generator().manual_seed(9)
        s, t = torch.randn(2, 256, 32, generator=g), torch.randn(2, 256, 32, generator=g)
        torch.testing.assert_close(m({"dino_src": s, "dino_trg": t}), official_cpm_by_hand(feat, cpm_sd, s, t), rtol=1e-5, atol=1e-5)

    assert main(["prompts", "show", str(tmp_path / "class")]) == 0
    assert "categories (3): bird, bottle, car" in capsys.readouterr().out


def test_what_a_prompt_is_is_said_whole_and_without_markup(feat, tmp_path, capsys):
    """`prompts show` and the hub model card said what a prompt is by its class docstring's
    first line: "... (the official ``Img`` mode): every" and "... (looked up as", cut off
    mid-sentence, with reST's backquotes in a terminal."""
    from sd4match.cli import main
    from sd4match.prompts import PROMPT_CLASSES
    from sd4match.prompts.base import kind_summary
    from sd4match.prompts.hub import model_card

    for kind in PROMPT_CLASSES:
        plain, md = kind_summary(kind), kind_summary(kind, markdown=True)
        assert plain.endswith(".") and "\n" not in plain and "`" not in plain and "``" not in md, (kind, plain, md)
    assert kind_summary("cpm-image") == ("CPM conditioned on each picture's own tokens (the official Img mode): every picture gets its own prompt, "
                                         "so its features are made once per picture.")
    p = make_prompt("hidden-category", feat, categories=["cat", "dog"])
    p.save(tmp_path / "hc")
    assert main(["prompts", "show", str(tmp_path / "hc")]) == 0
    assert ("  what it is: 77 learned rows of CLIP output per category; a pair uses its category's (looked up as a category prompt looks it up: "
            "base name, then the PF-Willow aliases).\n") in capsys.readouterr().out
    assert "- **What it is**: `hidden-category`: 77 learned rows of CLIP output per category; a pair uses its category's (looked up as a `category` " \
           "prompt looks it up: base name, then the PF-Willow aliases).\n" in model_card(tmp_path / "hc", "me/hc")


class _Note:  # a Python object pickled beside the tensors
    pass


def test_import_errors_name_the_file(feat, models, tmp_path, capsys):
    import pickle

    from sd4match.cli import main
    from sd4match.prompts.official import import_official

    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    model_args = ["--model", str(models["sd2"]), "--device", "cpu"]
    good = tmp_path / "caption.pt"
    torch.save({"dataset": official_sequence(feat, 1)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    msg = err(["prompts", "import", str(cut), "--kind", "single", "--out", str(tmp_path / "x"), *model_args])
    assert msg.startswith(f"sd4match: error: {cut}: cannot read") and "\n" not in msg
    assert msg.endswith("(cut short or corrupt: its zip archive is incomplete)")
    assert not (tmp_path / "x").exists()
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"dataset": object()}))
    assert err(["prompts", "import", str(evil), "--kind", "single", "--out", str(tmp_path / "y"), *model_args]).endswith(
        "cannot read as a released prompt file (not a file torch.save wrote, or one cut short)")
    torch.save({"dataset": official_sequence(feat, 1), "note": _Note()}, tmp_path / "objects.pt")  # torch.save's own pickle, with an object
    msg = err(["prompts", "import", str(tmp_path / "objects.pt"), "--kind", "single", "--out", str(tmp_path / "y"), *model_args])
    assert msg == f"sd4match: error: {tmp_path / 'objects.pt'}: cannot read as a released prompt file (it holds Python objects ({__name__}._Note), not only tensors, and sd4match unpickles tensors only)"
    torch.save({k: torch.zeros(2) for k in CPM_KEYS}, tmp_path / "cpm.pt")
    assert err(["prompts", "import", str(tmp_path / "cpm.pt"), "--kind", "single", "--out", str(tmp_path / "y"), *model_args]).endswith(
        "this one holds 'alpha_cond', 'global_embeds', 'linear_C.bias', 'linear_C.weight', 'linear_N.bias', 'linear_N.weight', 'positional_embedding' "
        "(a CPM checkpoint? use --kind cpm)")
    torch.save({"car": official_sequence(feat, 2)}, tmp_path / "class.pt")
    assert "use --kind category" in err(["prompts", "import", str(tmp_path / "class.pt"), "--kind", "single", "--out", str(tmp_path / "z"), *model_args])
    torch.save({"dataset": torch.zeros(1, 77, 48)}, tmp_path / "wide.pt")
    with pytest.raises(Sd4MatchError, match=r"wide\.pt: prompt 'dataset' is \(1, 77, 48\), but this text encoder takes \(1, 77, 32\)"):
        import_official(tmp_path / "wide.pt", "single", feat, tmp_path / "w")
    torch.save(official_cpm_state(feat, dino_dim=16), tmp_path / "ckpt16.pt")
    with pytest.raises(Sd4MatchError, match=r"made for 16-d DINOv2 tokens, but dinov2-b gives 768-d ones"):
        import_official(tmp_path / "ckpt16.pt", "cpm", feat, tmp_path / "c", dino="dinov2-b", dino_dim=768)
    with pytest.raises(Sd4MatchError, match="this is a CPM checkpoint"):
        import_official(tmp_path / "ckpt16.pt", "category", feat, tmp_path / "c2")
    with pytest.raises(Sd4MatchError, match="CPM checkpoint: it lacks positional_embedding"):
        import_official(good, "cpm", feat, tmp_path / "c3")


def test_hidden_state_files_are_used_as_encoder_hidden_states(feat, models, tmp_path, capsys):
    """--learn_hidden_state files: the 77 rows are CLIP *outputs*, handed to the UNet unchanged
    (official sd_feature_extractor.py:87-89). Single and Class layouts; a HiddenState file
    given as single/category is refused (by its rows and by its folder name), and a
    TokenEmbeds file given as hidden."""
    from PIL import Image

    from sd4match.cli import main

    model_args = ["--model", str(models["sd2"]), "--device", "cpu"]
    g = torch.Generator().manual_seed(3)
    single = {"dataset": torch.rand(1, 77, feat.prompt_dim, generator=g)}  # as the official code initialises them
    classes = {"cat": torch.rand(1, 77, feat.prompt_dim, generator=g), "dog": torch.rand(1, 77, feat.prompt_dim, generator=g)}
    hs = tmp_path / "Single_spair_sd2-1_HiddenState"
    hs.mkdir()
    torch.save(single, hs / "caption.pt")
    torch.save(classes, tmp_path / "class_hidden.pt")
    assert main(["prompts", "import", str(hs / "caption.pt"), "--kind", "hidden", "--out", str(tmp_path / "h1"), *model_args]) == 0
    assert main(["prompts", "import", str(tmp_path / "class_hidden.pt"), "--kind", "hidden", "--out", str(tmp_path / "h2"), *model_args]) == 0
    assert "hidden prompt" in capsys.readouterr().out
    p1, p2 = load_prompt(tmp_path / "h1", feat), load_prompt(tmp_path / "h2", feat)
    assert p1.kind == "hidden" and p2.kind == "hidden-category" and p2.config.categories == ["cat", "dog"]
    assert torch.equal(p1({}), single["dataset"])
    assert torch.equal(p2({"categories": ["dog", "cat"]}), torch.cat([classes["dog"], classes["cat"]]))
    im = [Image.new("RGB", (80, 60), (200, 30, 10))]
    with torch.no_grad():
        got = feat(im, prompt_embeds=p1({}), generator=torch.Generator().manual_seed(0))
        want = feat(im, prompt_embeds=single["dataset"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)

    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    torch.save(single, tmp_path / "caption.pt")  # same rows, folder name silent: told by its first row
    msg = err(["prompts", "import", str(tmp_path / "caption.pt"), "--kind", "single", "--out", str(tmp_path / "x1"), *model_args])
    assert "does not start with this text encoder's BOS embedding row" in msg and "--kind hidden" in msg and "\n" not in msg
    assert "its folder says so" in err(["prompts", "import", str(hs / "caption.pt"), "--kind", "single", "--out", str(tmp_path / "x2"), *model_args])
    assert "--kind hidden" in err(["prompts", "import", str(tmp_path / "class_hidden.pt"), "--kind", "category", "--out", str(tmp_path / "x3"), *model_args])
    torch.save({"dataset": official_sequence(feat, 1)}, tmp_path / "tok.pt")
    assert "use --kind single" in err(["prompts", "import", str(tmp_path / "tok.pt"), "--kind", "hidden", "--out", str(tmp_path / "x4"), *model_args])
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 5))


def test_cpm_files_with_no_global_rows_or_other_lengths(feat, models, tmp_path):
    """G0 (no global_embeds key) and G10-C30 files: lengths read from the shapes; the prompt
    equals the official module written out by hand. Head/Img-mode files are refused by name."""
    from sd4match.prompts.official import import_official

    for n_global, n_cond in ((0, 50), (10, 30)):
        g = torch.Generator().manual_seed(n_global)
        d = feat.prompt_dim
        sd = official_cpm_state(feat)
        sd["positional_embedding"], sd["alpha_cond"] = torch.rand(1, n_cond, d, generator=g), torch.rand(1, n_cond, d, generator=g)
        if n_global:
            sd["global_embeds"] = torch.rand(1, n_global, d, generator=g)
        else:
            del sd["global_embeds"]
        torch.save(sd, tmp_path / f"ckpt{n_global}.pt")
        m = load_prompt(import_official(tmp_path / f"ckpt{n_global}.pt", "cpm", feat, tmp_path / f"cpm{n_global}", dino_dim=32), feat)
        assert (m.config.n_global, m.config.n_cond) == (n_global, n_cond)
        s, t = torch.randn(2, 256, 32, generator=g), torch.randn(2, 256, 32, generator=g)
        x = torch.cat([s, t], dim=2) @ sd["linear_C.weight"].T + sd["linear_C.bias"]
        x = (x.permute(0, 2, 1) @ sd["linear_N.weight"].T + sd["linear_N.bias"]).permute(0, 2, 1)
        x = torch.nn.functional.adaptive_max_pool1d(x.permute(0, 2, 1), n_cond).permute(0, 2, 1)
        cond = torch.tanh(sd["alpha_cond"]) * (sd["positional_embedding"] + x)
        tok = feat.tokenizer
        n = n_global + n_cond
        with torch.no_grad():
            ids = torch.tensor([[tok.bos_token_id] + [7] * n + [tok.eos_token_id] + [0] * (75 - n)])
            dummy = emb_layer(feat)(input_ids=ids)
            parts = [dummy[:, :1].expand(2, -1, -1)] + ([sd["global_embeds"].expand(2, -1, -1)] if n_global else []) + [cond, dummy[:, n + 1 :].expand(2, -1, -1)]
            want = clip_by_hand(feat.text_encoder, torch.cat(parts, dim=1))
            torch.testing.assert_close(m({"dino_src": s, "dino_trg": t}), want, rtol=1e-5, atol=1e-5)


def _cpm_variant_by_hand(feat, sd, mode, ftype, s, t, n_global, n_cond):
    """The official HybridCaptioner's forward for each mode, written out here
    (hybrid_captioner.py: Img/Pair x Feat/Head), then CLIP as the token_embeds path."""
    lin = lambda x, n: x @ sd[f"{n}.weight"].T + sd[f"{n}.bias"]  # noqa: E731
    pool = lambda x: torch.nn.functional.adaptive_max_pool1d(x.permute(0, 2, 1), n_cond).permute(0, 2, 1)  # noqa: E731
    if mode == "Pair" and ftype == "Head":
        x = lin(torch.cat([s, t], dim=1), "linear").unsqueeze(1)  # pooler outputs (B, C) each
    elif mode == "Img" and ftype == "Head":
        x = lin(s, "linear").unsqueeze(1)
    else:  # Img-Feat
        x = pool(lin(s, "linear"))
    cond = torch.tanh(sd["alpha_cond"]) * (sd["positional_embedding"] + x)
    tok = feat.tokenizer
    n = n_global + n_cond
    b = cond.shape[0]
    with torch.no_grad():
        dummy = emb_layer(feat)(input_ids=torch.tensor([[tok.bos_token_id] + [7] * n + [tok.eos_token_id] + [0] * (75 - n)]))
        parts = [dummy[:, :1].expand(b, -1, -1)] + ([sd["global_embeds"].expand(b, -1, -1)] if n_global else []) + [cond, dummy[:, n + 1 :].expand(b, -1, -1)]
        return clip_by_hand(feat.text_encoder, torch.cat(parts, dim=1))


@pytest.mark.parametrize("mode,ftype", [("Pair", "Head"), ("Img", "Feat"), ("Img", "Head")])
def test_official_cpm_head_and_img_modes(feat, tmp_path, mode, ftype):
    """Pair-Head (pooled CLS of both pictures), Img-Feat and Img-Head (each picture's own
    tokens) files, named by their official folder, import and equal the official forward."""
    from sd4match.prompts.official import import_official

    d, n_global, n_cond = feat.prompt_dim, 25, 50
    g = torch.Generator().manual_seed(11)
    width = 64 if mode == "Pair" else 32
    sd = {"global_embeds": torch.rand(1, n_global, d, generator=g), "positional_embedding": torch.rand(1, n_cond, d, generator=g),
          "alpha_cond": torch.rand(1, n_cond, d, generator=g), "linear.weight": torch.randn(d, width, generator=g) * 0.05,
          "linear.bias": torch.randn(d, generator=g) * 0.05}
    folder = tmp_path / f"CPM_spair_sd2-1_{mode}-DINO-{ftype}-G{n_global}-C{n_cond}"
    folder.mkdir()
    torch.save(sd, folder / "ckpt.pt")
    p = load_prompt(import_official(folder / "ckpt.pt", "cpm", feat, tmp_path / "out", dino_dim=32), feat)
    assert p.kind == ("cpm" if mode == "Pair" else "cpm-image") and p.dino_part == ("cls" if ftype == "Head" else "patches")
    assert p.per_pair == (mode == "Pair") and p.per_picture_condition == (mode == "Img")
    s = torch.randn(2, 1 if ftype == "Head" else 256, 32, generator=g)
    t = torch.randn(2, 1 if ftype == "Head" else 256, 32, generator=g)
    with torch.no_grad():
        if mode == "Pair":
            got, want = p({"dino_src": s, "dino_trg": t}), _cpm_variant_by_hand(feat, sd, mode, ftype, s[:, 0], t[:, 0], n_global, n_cond)
        else:
            x = s[:, 0] if ftype == "Head" else s
            got, want = p({"dino": s}), _cpm_variant_by_hand(feat, sd, mode, ftype, x, None, n_global, n_cond)
            # a pair batch gives the sources' prompts, then the targets'
            both = p({"dino_src": s, "dino_trg": t})
            torch.testing.assert_close(both[:2], got)
            torch.testing.assert_close(both[2:], p({"dino": t}))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without the folder name, an Img file cannot be told from its keys: said so, and --cpm-config names it
    torch.save(sd, tmp_path / "ckpt.pt")
    if mode == "Img":
        with pytest.raises(Sd4MatchError, match="cannot tell apart: name it with --cpm-config"):
            import_official(tmp_path / "ckpt.pt", "cpm", feat, tmp_path / "o2", dino_dim=32)
    q = load_prompt(import_official(tmp_path / "ckpt.pt", "cpm", feat, tmp_path / "o3", dino_dim=32, cpm_config=f"{mode}-DINO-{ftype}-G25-C50"), feat)
    assert q.kind == p.kind and q.dino_part == p.dino_part
    with pytest.raises(Sd4MatchError, match="CLIP image features"):
        import_official(tmp_path / "ckpt.pt", "cpm", feat, tmp_path / "o4", cpm_config="Img-CLIP-Head-G25-C50")
    with pytest.raises(Sd4MatchError, match="says G10-C50"):
        import_official(tmp_path / "ckpt.pt", "cpm", feat, tmp_path / "o5", dino_dim=32, cpm_config=f"{mode}-DINO-{ftype}-G10-C50")


def test_mean_input_is_the_patch_mean_through_the_head_layer(feat):
    """cpm_input="mean": the mean of each picture's patch tokens in place of CLS (a global
    descriptor of the same tokens), through the Head path."""
    from sd4match.prompts import make_prompt

    m = make_prompt("cpm", feat, dino_dim=32, cpm_input="mean", seed=3)
    c = make_prompt("cpm", feat, dino_dim=32, cpm_input="cls", seed=3)
    c.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 256, 32, generator=g), torch.randn(2, 256, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m({"dino_src": s, "dino_trg": t}), c({"dino_src": s.mean(1, keepdim=True), "dino_trg": t.mean(1, keepdim=True)}))
    assert m.dino_part == "patches" and c.dino_part == "cls"


def test_plain_cpm_is_the_projection_alone(feat):
    """plain: no global rows, positional embedding or gate; the conditional rows are
    pool(linear_N(linear_C(src || trg))), by hand."""
    from sd4match.prompts import make_prompt

    p = make_prompt("cpm", feat, dino_dim=32, plain=True, n_cond=40, seed=2)
    assert {n for n, _ in p.named_parameters()} == {"linear_C.weight", "linear_C.bias", "linear_N.weight", "linear_N.bias"}
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 256, 32, generator=g), torch.randn(2, 256, 32, generator=g)
    sd = p.state_dict()
    x = torch.cat([s, t], dim=2) @ sd["linear_C.weight"].T + sd["linear_C.bias"]
    x = (x.permute(0, 2, 1) @ sd["linear_N.weight"].T + sd["linear_N.bias"]).permute(0, 2, 1)
    rows = torch.nn.functional.adaptive_max_pool1d(x.permute(0, 2, 1), 40).permute(0, 2, 1)
    tok = feat.tokenizer
    with torch.no_grad():
        dummy = emb_layer(feat)(input_ids=torch.tensor([[tok.bos_token_id] + [7] * 40 + [tok.eos_token_id] + [0] * 35]))
        want = clip_by_hand(feat.text_encoder, torch.cat([dummy[:, :1].expand(2, -1, -1), rows, dummy[:, 41:].expand(2, -1, -1)], dim=1))
        torch.testing.assert_close(p({"dino_src": s, "dino_trg": t}), want, rtol=1e-5, atol=1e-5)


def test_a_run_or_evaluation_folder_given_as_a_prompt_is_named_for_what_it_is(feat, tmp_path):
    """--prompt runs/x (the training run) instead of runs/x/best gave "config.json: not a valid
    prompt config (PromptConfig.__init__() got an unexpected keyword argument 'dataset')";
    it now names the run's prompt folders. An evaluation's folder is named as such."""
    from sd4match.prompts import check_prompt

    run = tmp_path / "run"
    make_prompt("single", feat).save(run / "best")
    make_prompt("single", feat).save(run / "last")
    (run / "config.json").write_text('{"dataset": "spair", "lr": 0.01}')  # a training run's own settings
    with pytest.raises(Sd4MatchError) as e:
        check_prompt(str(run))
    assert str(e.value) == f"{run}: a training run's folder, not a prompt folder: its prompts are {run / 'best'} and {run / 'last'}"
    assert check_prompt(str(run / "best")).kind == "single"
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "score.json").write_text("{}")
    with pytest.raises(Sd4MatchError, match=r"ev: an evaluation's folder, not a prompt folder \(its score.json names the prompt it evaluated\)$"):
        check_prompt(str(ev))


def test_a_text_template_holds_category_only(feat, capsys, fixture_images, tmp_path):
    """'text:a {cat}' or an unclosed brace ended in KeyError / ValueError tracebacks at the
    first encoded batch, after the model had loaded (and, matching one pair, a wrong field
    was kept as literal text); now one line before anything loads. Doubled braces are
    literal braces with categories and without."""
    from sd4match.cli import main
    from sd4match.prompts import parse_prompt

    for text, msg in (("a {cat}", r"\{cat\} is not a field; a template may hold \{category\} only"),
                      ("{category", r"expected '\}' before end of string"), ("{0} of a {category}", r"\{0\} is not a field")):
        with pytest.raises(Sd4MatchError, match=msg):
            parse_prompt(f"text:{text}")
        with pytest.raises(Sd4MatchError, match=msg):
            make_prompt("text", feat, template=text)
    assert main(["match", str(fixture_images / "cat.jpg"), str(fixture_images / "pets.jpg"), "--prompt", "text:a {cat}", "--model", "effnet-lite0",
                 "--device", "cpu", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == ("sd4match: error: --prompt text:a {cat}: {cat} is not a field; a template may hold {category} only "
                                               "(write {{ and }} for a literal brace)")
    p = make_prompt("text", feat, template="a {{b}} photo")
    want = bridge_for(feat).encode_text(["a {b} photo"])
    assert torch.equal(p({}), want) and torch.equal(p({"categories": ["cat", "dog"]}), want.expand(2, -1, -1))


def test_a_category_prompt_without_the_split_s_categories_is_named_before_the_model_loads(feat, models, tmp_path, willow_root, fixture_images,
                                                                                          no_model_load, capsys):
    """A per-category prompt asked for categories it never learned: one line naming them
    before the model loads (before: at the first pair, after the load). PF-Willow's car(G)
    and car(S) are found under car, as the prompt looks them up."""
    from sd4match.cli import main

    folder = make_prompt("category", feat, categories=["car", "motorbike"]).save(tmp_path / "cats")
    assert main(["evaluate", "--prompt", str(folder), "--model", str(models["sd2"]), "--dataset", "pfwillow", "--root", str(willow_root),
                 "--split", "test", "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: --prompt {folder}: has no learned prompt for duck(S), winebottle(wC) "
                                               "(it knows car, motorbike)")
    assert main(["match", str(fixture_images / "cat.jpg"), str(fixture_images / "pets.jpg"), "--prompt", str(folder), "--category", "cat",
                 "--model", str(models["sd2"]), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == f"sd4match: error: --prompt {folder}: has no learned prompt for cat (it knows car, motorbike)"
