"""`sd4match features`: extraction, content-keyed caching, corrupt cache files."""

import json
import shutil

import pytest
import torch

from sd4match.cli import main
from sd4match.extract import load_cached


@pytest.fixture
def small_images(tmp_path, fixture_images):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("cat.jpg", "pets.jpg", "owl.jpg"):
        shutil.copy(fixture_images / n, d / n)
    return d


def run_features(images, out, *extra):
    return main(["features", "--model", "effnet-lite0", "--resolution", "128", "--images", str(images), "--out", str(out), "--device", "cpu", *extra])


def test_extract_skip_and_recompute(tmp_path, small_images):
    out = tmp_path / "cache"
    assert run_features(small_images, out) == 0
    idx = json.loads((out / "index.json").read_text())
    assert set(idx["images"]) == {"cat.jpg", "pets.jpg", "owl.jpg"}
    assert idx["images"]["cat.jpg"]["grid_size"] == [8, 8]
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("features/*.safetensors")}
    assert len(files) == 3
    a = load_cached(out / "index.json", "cat.jpg")
    assert a.shape == (432, 8, 8)
    # second run: nothing rewritten
    assert run_features(small_images, out) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("features/*.safetensors")} == files
    # a truncated cache file is detected and recomputed, to the same values
    victim = out / idx["images"]["cat.jpg"]["file"]
    victim.write_bytes(victim.read_bytes()[:100])
    assert run_features(small_images, out) == 0
    torch.testing.assert_close(load_cached(out / "index.json", "cat.jpg"), a)
    # other settings: other keys, old entries kept
    assert run_features(small_images, out, "--resolution", "160") == 0
    assert len(list(out.glob("features/*.safetensors"))) == 6


def test_renamed_image_keeps_its_key(tmp_path, small_images):
    out = tmp_path / "cache"
    run_features(small_images, out)
    before = json.loads((out / "index.json").read_text())["images"]["owl.jpg"]["file"]
    (small_images / "owl.jpg").rename(small_images / "night-bird.jpg")
    run_features(small_images, out)
    assert json.loads((out / "index.json").read_text())["images"]["night-bird.jpg"]["file"] == before


def test_sd_features_are_seeded_per_image(tmp_path, small_images):
    from sd4match.testing import tiny_sd

    model = tiny_sd(tmp_path / "tiny")
    out1, out2 = tmp_path / "c1", tmp_path / "c2"
    common = ["features", "--model", str(model), "--resolution", "64", "--ensemble", "2", "--device", "cpu"]
    assert main(common + ["--images", str(small_images), "--out", str(out1), "--batch-size", "1"]) == 0
    assert main(common + ["--images", str(small_images), "--out", str(out2), "--batch-size", "3"]) == 0
    for name in ("cat.jpg", "owl.jpg"):
        torch.testing.assert_close(load_cached(out1 / "index.json", name), load_cached(out2 / "index.json", name))


def test_dinov2_features_use_the_same_cache(tmp_path, small_images):
    from sd4match.testing import tiny_dinov2

    model = tiny_dinov2(tmp_path / "dino")
    out = tmp_path / "dino-cache"
    args = ["features", "--model", str(model), "--images", str(small_images), "--out", str(out), "--device", "cpu", "--resolution", "112"]
    assert main(args) == 0
    idx = json.loads((out / "index.json").read_text())
    # DINOv2 as a matching backbone: the picture squashed to --resolution (112 = 8 patches of 14)
    assert idx["settings"]["featurizer"] == "dinov2" and idx["images"]["cat.jpg"]["grid_size"] == [8, 8]
    assert load_cached(out / "index.json", "owl.jpg").shape == (32, 8, 8)
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("features/*.safetensors")}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("features/*.safetensors")} == files


def test_store_files_have_the_permissions_of_index_json(tmp_path, small_images):
    import stat

    out = tmp_path / "cache"
    assert run_features(small_images, out) == 0
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [out / "index.json", *out.glob("features/*.safetensors")]}
    assert len(modes) == 1, modes


def test_bad_pictures_are_all_named_before_the_model_loads(tmp_path, small_images, monkeypatch, capsys):
    """An empty file, a text file named .png and a 1 x 1 picture: one line names all three,
    and no model is loaded (before, the first was found only after the model had loaded
    and the pictures before it had been extracted)."""
    import sd4match.cli as cli
    from PIL import Image

    (small_images / "sub").mkdir()
    (small_images / "sub" / "empty.jpg").write_bytes(b"")
    (small_images / "notes.png").write_text("not a picture")
    Image.new("RGB", (1, 1)).save(small_images / "one.png")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", no_load)
    monkeypatch.setattr(cli, "load_matcher", no_load)
    assert main(["features", "--model", "effnet-lite0", "--images", str(small_images), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"sd4match: error: {small_images / 'notes.png'}: not a readable image")
    assert "(and 2 more bad picture(s): " in err[0]
    assert f"{small_images / 'one.png'}: image is 1x1 pixels, too small to match" in err[0]
    assert f"{small_images / 'sub' / 'empty.jpg'}: not a readable image" in err[0]
    assert not (tmp_path / "out").exists()
    # transfer checks its targets the same way
    points = tmp_path / "p.json"
    points.write_text('{"eye": [10, 10]}')
    assert main(["transfer", "--source", str(small_images / "cat.jpg"), "--points", str(points), "--targets", str(small_images),
                 "--model", "effnet-lite0", "--out", str(tmp_path / "tr")]) == 2
    assert "(and 2 more bad picture(s): " in capsys.readouterr().err


def test_features_no_progress(tmp_path, small_images, capsys):
    assert run_features(small_images, tmp_path / "out", "--no-progress") == 0
    assert "img/s" not in capsys.readouterr().err


def test_text_for_a_model_without_prompts_is_refused(tmp_path, small_images, capsys):
    """--text with effnet-lite0 was ignored while index.json recorded it as a setting."""
    assert run_features(small_images, tmp_path / "out", "--text", "a cat") == 2
    assert capsys.readouterr().err.strip().endswith("effnet-lite0 takes no prompt: --text would change nothing; leave it out")
    assert not (tmp_path / "out" / "index.json").exists()


def test_features_of_a_trained_prompt_equal_what_match_computes(tmp_path, small_images, capsys, monkeypatch):
    """`features` took only --text: a trained prompt's maps, the ones a user wants for their
    own downstream use, could not be extracted. --prompt takes any prompt that gives a
    picture a map of its own (single, category with --category, cpm-image with DINOv2), and
    its maps equal those `match` computes for the picture with that prompt; a per-pair CPM
    prompt, a missing --category, a prompt for a model without prompts and --text beside
    --prompt are each one line before any model loads."""
    from sd4match.features import DinoFeaturizer, SDFeaturizer
    from sd4match.prompts import make_prompt
    from sd4match.testing import tiny_dinov2, tiny_sd
    from sd4match.usermatch import Matcher, open_image

    sd, dino_dir = tiny_sd(tmp_path / "sd"), tiny_dinov2(tmp_path / "dino")
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=1)
    dino = DinoFeaturizer.from_pretrained(dino_dir)
    shape = {"dino_dim": dino.feature_dim, "n_patches": dino.grid_size[0] * dino.grid_size[1], "dino_model": str(dino_dir)}
    make_prompt("single", feat, seed=3).save(tmp_path / "single")
    make_prompt("category", feat, categories=["cat", "owl"], seed=4).save(tmp_path / "category")
    make_prompt("cpm-image", feat, seed=5, **shape).save(tmp_path / "cpm-image")
    make_prompt("cpm", feat, **shape).save(tmp_path / "cpm")
    common = ["features", "--model", str(sd), "--resolution", "64", "--ensemble", "1", "--device", "cpu", "--no-progress", "--images", str(small_images)]
    a, b = open_image(small_images / "cat.jpg"), open_image(small_images / "owl.jpg")
    maps = {}
    for kind, extra in (("single", []), ("category", ["--category", "cat"]), ("cpm-image", [])):
        out = tmp_path / f"f-{kind}"
        assert main([*common, "--prompt", str(tmp_path / kind), *extra, "--out", str(out)]) == 0
        m = Matcher(feat, str(tmp_path / kind), category="cat" if extra else None, dino=dino if kind == "cpm-image" else None)
        want_a, want_b = m.features(a, b)
        torch.testing.assert_close(load_cached(out / "index.json", "cat.jpg")[None], want_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_cached(out / "index.json", "owl.jpg")[None], want_b, rtol=1e-5, atol=1e-5)
        settings = json.loads((out / "index.json").read_text())["settings"]
        assert settings["prompt"] == str(tmp_path / kind) and settings["category"] == ("cat" if extra else None)
        maps[kind] = want_a
    assert main([*common, "--out", str(tmp_path / "f-empty")]) == 0
    empty = load_cached(tmp_path / "f-empty" / "index.json", "cat.jpg")[None]
    assert all(not torch.allclose(m, empty) for m in maps.values())  # each prompt changed the maps
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sd4match.cli.load_model", no_model)
    for argv, err in (
        ([*common, "--prompt", str(tmp_path / "cpm")],
         f"--prompt {tmp_path / 'cpm'}: a cpm prompt makes a picture's map from both pictures of a pair, so a picture alone has none; "
         "use `sd4match match` or `transfer` with it, or a prompt of one picture (e.g. cpm-image)"),
        ([*common, "--prompt", str(tmp_path / "category")], f"--prompt {tmp_path / 'category'}: this prompt needs --category"),
        ([*common, "--text", "a photo of a {category}"], "--prompt text:a photo of a {category}: this prompt needs --category"),
        ([*common, "--text", "a cat", "--prompt", "empty"], "give a text prompt as --text or as --prompt text:..., not both"),
        (["features", "--model", "effnet-lite0", "--images", str(small_images), "--prompt", str(tmp_path / "single")],
         f"effnet-lite0 takes no prompt: --prompt {tmp_path / 'single'} would change nothing; leave it out"),
    ):
        assert main([*argv, "--out", str(tmp_path / "refused")]) == 2, argv
        assert capsys.readouterr().err.strip() == f"sd4match: error: {err}"
    assert not (tmp_path / "refused").exists()


def test_feature_pca_finds_the_axes_of_known_variance():
    import numpy as np

    from sd4match.viz import feature_pca

    # 24 cells: every sign pattern of (a, b, c) three times, features 3a q1 + 2b q2 + c q3 in a
    # rotated basis: mean 0, variances 9, 4, 1 along q1, q2, q3 exactly, nothing along q4
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))[0]
    coef = np.array([(3 * a, 2 * b, c) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)] * 3, dtype=float)
    cells = coef @ q[:, :3].T
    maps = [cells[:16].T.reshape(4, 4, 4), cells[16:].T.reshape(4, 2, 4)]  # two pictures' (C, h, w) maps
    proj, share = feature_pca(maps, normalise=False)
    np.testing.assert_allclose(share, [9 / 14, 4 / 14, 1 / 14], atol=1e-12)
    signs = np.sign(q[np.abs(q[:, :3]).argmax(axis=0), [0, 1, 2]])  # each axis's largest loading made positive
    want = coef * signs
    got = np.concatenate([proj[0].reshape(-1, 3), proj[1].reshape(-1, 3)])
    assert proj[0].shape == (4, 4, 3) and proj[1].shape == (2, 4, 3)
    np.testing.assert_allclose(got, want, atol=1e-9)
    # drawn from every cell or from a sample of them (seeded): the same sample gives the same axes
    again = feature_pca(maps, normalise=False, max_cells=20, seed=3)[0]
    np.testing.assert_array_equal(again[1], feature_pca(maps, normalise=False, max_cells=20, seed=3)[0][1])


def test_feature_pca_sees_the_cosine_and_colours_alike_across_pictures():
    import numpy as np

    from sd4match.viz import feature_pca, pca_colours

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3, 5)), rng.normal(size=(6, 4, 2))
    b[:, 0, 0] = a[:, 1, 2]  # one descriptor in both pictures ...
    scaled = b.copy()
    scaled[:, 0, 0] *= 7.0  # ... and 7 times longer: the same for the cosine
    pa, pb = feature_pca([a, b])[0], feature_pca([a, scaled])[0]
    np.testing.assert_allclose(pb[1], pa[1], atol=1e-6)
    ca, cb = pca_colours(pa)
    assert ca.dtype == np.uint8 and ca.shape == (3, 5, 3)
    np.testing.assert_array_equal(ca[1, 2], cb[0, 0])
    # one scale for all pictures: percentiles 1 and 99 of every cell, hand-checked for axis 1
    every = np.concatenate([pa[0].reshape(-1, 3), pa[1].reshape(-1, 3)])
    lo, hi = np.percentile(every[:, 0], 1), np.percentile(every[:, 0], 99)
    want = np.round(np.clip((pa[0][..., 0] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(ca[..., 0], want)


def test_features_pca_sheet_shows_each_cell_in_its_colour(tmp_path, small_images, capsys):
    import numpy as np
    from PIL import Image

    from sd4match.viz import feature_pca, pca_colours

    out = tmp_path / "f"
    assert run_features(small_images, out, "--pca", "2") == 0
    assert "pca.png" in capsys.readouterr().err
    idx = json.loads((out / "index.json").read_text())
    first = list(idx["images"])[:2]  # the index's order: the folder's sorted order
    assert first == ["cat.jpg", "owl.jpg"]
    colours = pca_colours(feature_pca([load_cached(out / "index.json", n) for n in first])[0])
    sheet = np.asarray(Image.open(out / "pca.png").convert("RGB"))
    x0 = 8  # the row's left pad
    for k, name in enumerate(first):
        w, h = Image.open(small_images / name).size
        tw, th = round(w * 256 / h), 256  # each picture drawn 256 rows tall, its PCA beside it at the same size
        x0 += tw + 8  # past the picture and a pad: its PCA
        for i, j in ((0, 0), (3, 5), (7, 7)):  # the centre pixel of cell (row i, column j) of the 8 x 8 grid
            x, y = x0 + int((j + 0.5) * tw / 8), 8 + int((i + 0.5) * th / 8)
            assert tuple(sheet[y, x]) == tuple(colours[k][i, j]), (name, i, j)
        x0 += tw + 8  # past the PCA and a pad: the next picture


def test_a_store_inside_the_image_folder_is_not_read_as_pictures(tmp_path, small_images):
    out = small_images / "feat"  # the store (and its pca.png) inside the folder of pictures
    for _ in range(2):
        assert run_features(small_images, out, "--pca", "3") == 0
        assert sorted(json.loads((out / "index.json").read_text())["images"]) == ["cat.jpg", "owl.jpg", "pets.jpg"]
    assert (out / "pca.png").is_file()


def test_a_second_extraction_into_a_store_in_use_is_refused(tmp_path, small_images, capsys, no_model_load):
    """Two extractions into one store folder each wrote its index.json (the last one won,
    listing only its pictures): the second is refused in one line before any model loads."""
    from conftest import hold_lock

    out = tmp_path / "store"
    holder = hold_lock(out)
    try:
        assert run_features(small_images, out) == 2
        assert capsys.readouterr().err.strip() == f"sd4match: error: {out}: another feature extraction is writing here (pid 4242); wait for it to end or choose another --out"
        assert not (out / "index.json").exists()
    finally:
        holder.close()
    (tmp_path / "file").write_text("x")
    assert run_features(small_images, tmp_path / "file") == 2
    assert "file" in capsys.readouterr().err
