"""The README's offline examples, run as pasted: the commands that need no weights (those with
``--model effnet-lite0``, and the shell lines that prepare them) and the Python snippets on
``effnet-lite0`` and on ``sd4match.testing``'s tiny model, each in a fresh folder that holds
what a clone has beside the README (``examples/``) and, for the evaluation snippet, the
PF-Willow fixture where the README's ``data/pf-willow`` is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: a bash block that runs offline as a whole (evaluate on effnet-lite0, then score what it wrote)
WHOLE_BLOCK = "--out runs/willow-look"
#: a distinctive piece of each README block that must run offline, as pasted: a README edit
#: that drops or renames one of them fails here, rather than leaving it untested
OFFLINE_BLOCKS = {
    "bash": ("--model effnet-lite0 --out runs/demo", "sd4match features --model effnet-lite0", "--out runs/cat-dog  # offline",
             "sd4match transfer --source examples/cat.jpg", "--source examples/pets.jpg --points", WHOLE_BLOCK),
    "python": ('sd4match.Matcher(sd4match.load_featurizer("effnet-lite0"))', 'tiny_sd("runs/tiny-sd")', 'sd4match.EvalConfig("pfwillow", "data/pf-willow", split',
               "class SamePlace(sd4match.Featurizer)"),
}


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced code block of README.md."""
    text = (ROOT / "README.md").read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def offline_lines(block: str) -> list[str]:
    """The lines of a shell block that run without weights: those on effnet-lite0 (not the
    page server, which runs until stopped) and the mkdir/echo lines that prepare them."""
    return [ln for ln in block.splitlines() if ("--model effnet-lite0" in ln and " serve " not in f" {ln} ") or ln.startswith("mkdir ")]


@pytest.fixture
def clone_folder(tmp_path, willow_root):
    """A folder laid out as a clone's root for the README's relative paths."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pf-willow").symlink_to(willow_root, target_is_directory=True)
    return tmp_path


def _run(args, cwd, label):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"README {label}: exit {p.returncode}\n{(p.stdout + p.stderr)[-3000:]}"
    return p


@pytest.mark.long
def test_the_readmes_offline_examples_run_as_pasted(clone_folder):
    blocks = readme_blocks()
    found = {lang: [key for key in keys if any(b_lang == lang and key in text for _, b_lang, text in blocks)] for lang, keys in OFFLINE_BLOCKS.items()}
    assert found == {lang: list(keys) for lang, keys in OFFLINE_BLOCKS.items()}, "an offline README example is gone or renamed"
    ran = 0
    for line, lang, text in blocks:
        if lang == "bash" and WHOLE_BLOCK in text:
            _run(["bash", "-euo", "pipefail", "-c", text], clone_folder, f"block at line {line}")
            ran += 1
        elif lang == "bash":
            for cmd in offline_lines(text):
                _run(["bash", "-euo", "pipefail", "-c", cmd], clone_folder, f"line {line}: {cmd}")
                ran += 1
        elif lang == "python" and any(key in text for key in OFFLINE_BLOCKS["python"]):
            _run([sys.executable, "-c", text], clone_folder, f"Python block at line {line}")
            ran += 1
    assert ran == 8 + len(OFFLINE_BLOCKS["python"])  # match x 3 (demo, demo-birds, cat-dog), features, mkdir + echo, transfer x 2, evaluate + score
    # what the commands say they write is there
    runs = clone_folder / "runs"
    for f in ("demo/matches.json", "demo/matches.png", "demo-birds/warped.png", "demo-birds/confidence.png", "demo-birds/dense.npz", "demo-birds/pca.png",
              "features/index.json", "features/pca.png", "cat-dog/matches.json", "transfer/sheet.png", "transfer/coco.json", "transfer-2/coco.json", "transfer-2/check.json", "my-prompt/prompt.safetensors", "my-prompt/config.json",
              "willow-effnet/score.json", "willow-same-place/score.json", "willow-look/pairs.jsonl", "willow-look/worst.png"):
        assert (runs / f).is_file(), f
