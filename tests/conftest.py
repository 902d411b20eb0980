"""Shared test helpers: where the real fixtures are, and stand-in images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SD4MATCH_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_dir(*parts: str) -> Path:
    """A folder of the real fixtures; skip the test (saying why) where it is absent."""
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real fixtures not found at {p} (set SD4MATCH_FIXTURES)")
    return p


@pytest.fixture
def spair_root() -> Path:
    return fixture_dir("SPair-71k")


@pytest.fixture
def willow_root() -> Path:
    return fixture_dir("pf-willow")


@pytest.fixture
def pascal_lists() -> Path:
    return fixture_dir("pf-pascal")


def stand_in_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random-noise JPEG/PNG of ``size`` = (W, H): the fixtures ship no images for SPair and PF-Pascal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def hub_snapshot(cache: Path, repo: str, commit: str) -> Path:
    """A repository in a hub cache laid out as huggingface_hub lays it out (``refs/main`` naming
    the commit, its files under ``snapshots/<commit>/``): the snapshot folder to fill."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return base / "snapshots" / commit


@pytest.fixture
def spair_with_images(tmp_path, spair_root) -> Path:
    """The real SPair-71k annotations plus stand-in JPEGs of the annotated sizes."""
    import json

    root = tmp_path / "SPair-71k"
    shutil.copytree(spair_root, root)
    for split in ("trn", "val", "test"):
        for f in (root / "PairAnnotation" / split).glob("*.json"):
            ann = json.loads(f.read_text())
            for side in ("src", "trg"):
                p = root / "JPEGImages" / ann["category"] / ann[f"{side}_imname"]
                if not p.exists():
                    stand_in_image(p, tuple(ann[f"{side}_imsize"][:2]))
    return root


@pytest.fixture
def no_model_load(monkeypatch):
    """The command line's model loading fails the test: what a test checks happens before any model loads."""

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sd4match.cli.load_model", no_model)


@pytest.fixture
def fixture_images() -> Path:
    return fixture_dir("images")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (compilation, real weights) or ``long`` (several processes: kill and
    resume, two-process runs; more variants of a default test's check) run only when selected:
    ``pytest -m slow``, ``pytest -m long`` (CI runs ``-m long`` after the default run)."""
    selected = config.getoption("-m") or ""
    for mark in ("slow", "long"):
        if mark in selected:
            continue
        skip = pytest.mark.skip(reason=f"{mark}: run with `python -m pytest -m {mark}`")
        for item in items:
            if mark in item.keywords:
                item.add_marker(skip)


def official_dino_hidden(model, pixel_values):
    """DINOv2's last hidden state as transformers 4.35 computes it, by another route than the
    library's hook: the 37 x 37 position grid is resized here with the old formula
    (``scale_factor = (h0 + 0.1) / 37``, bicubic) and put into a copy of the model as its own
    grid, which transformers then adds unchanged (its square, same-count early return)."""
    import copy
    import math

    import torch
    import torch.nn.functional as F

    m = copy.deepcopy(model)
    pos = m.embeddings.position_embeddings.data
    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    H, W = pixel_values.shape[-2:]
    assert H == W, "the square inputs the library uses"
    h0 = H // m.config.patch_size
    if h0 * h0 != n:
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (h0 + 0.1) / side), mode="bicubic", align_corners=False)
        m.embeddings.position_embeddings = torch.nn.Parameter(torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * h0, -1)], dim=1))
    with torch.no_grad():
        return m(pixel_values=pixel_values).last_hidden_state


@pytest.fixture
def two_and_one_process():
    """``run(args, two, one)``: ``sd4match ARGS --out TWO`` under torchrun with 2 CPU processes
    (gloo), then ``--out ONE`` in one fresh process, each with one thread a process (the same
    arithmetic); both must succeed. Returns the two completed processes."""
    import socket
    import subprocess
    import sys

    def run(args, two, one):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runs = []
        for launcher, out in ((["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)], two),
                              ([], one)):
            p = subprocess.run([sys.executable, *launcher, "-m", "sd4match", *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, "\n".join(line for line in p.stderr.splitlines() if "error" in line.lower())[-3000:] or p.stderr[-2000:]
            runs.append(p)
        return runs

    return run


def hold_lock(folder):
    """The folder's run lock held through another open file description, as a second process would see it."""
    import fcntl

    folder.mkdir(exist_ok=True)
    holder = open(folder / ".sd4match.lock", "a+")
    holder.write("pid 4242")
    holder.flush()
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return holder
