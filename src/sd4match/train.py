"""``sd4match train``: learn a prompt for matching, resumable and reproducible.

One readable loop (nanoGPT style): a frozen featurizer, a prompt, the Gaussian-window
cross-entropy, Adam, gradient accumulation to the effective batch, validation by
PCK@0.1 with the best prompt kept.

Reproducible by construction: the data order of epoch e is a permutation drawn from
(seed, e); every random draw of a training step (latent sample, noise) comes from a
generator seeded by (seed, step, micro-batch). A resumed run therefore continues
exactly where an uninterrupted one would be. Checkpoints (safetensors + JSON) are
written into a temporary folder, fsynced and renamed; the last two are kept.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd4match.data import load_pair_images, open_dataset
from sd4match.errors import Sd4MatchError, first_line
from sd4match.evaluate import EvalConfig, predict_pairs
from sd4match.frozen import Frozen, Picture, prefetch
from sd4match.runtime import gather_dicts, git_sha, hang_for_tests
from sd4match.store import Store
from sd4match.loss import gaussian_window_ce
from sd4match.matching import point_correlation
from sd4match.metrics import score

CKPT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to ``<out>/config.json``)."""

    dataset: str = "spair"  # spair | pfpascal | pfwillow | synthetic
    root: str = ""
    prompt: str = "single"  # single | category | cpm
    model: str = "sd-2-1"
    dino: str = "dinov2-b"  # DINOv2 for CPM
    timestep: int = 261
    up_block: int = 1
    ensemble: int = 1  # noisy copies in training
    resolution: int = 768
    temperature: float = 0.04  # softmax temperature of the loss
    window: int = 7  # Gaussian window (cells) of the loss target
    sigma: float = 1.5  # its sigma (cells)
    lr: float = 1e-2  # tokens, positional embedding, gate
    lr_linear: float = 1e-3  # CPM linear layers
    batch_size: int = 9  # effective batch (pairs per optimiser step)
    micro_batch: int = 1  # pairs per forward; batch_size / micro_batch accumulation steps
    steps: int = 30000  # optimiser steps (ignored when epochs > 0)
    epochs: float = 0  # > 0: train this many passes over the training pairs (the presets: SPair-71k 5, PF-Pascal 90)
    val_every: int = -1  # validate every N steps; -1: once per epoch (the official schedule); 0: never
    val_rule: str = "nn"  # match rule of validation (the official model selection: nearest neighbour)
    val_pairs: int = 0  # validate on the first N val pairs (0: all)
    val_ensemble: int = 1
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    amp_dtype: str | None = None  # bf16 | fp16 on GPU
    apply_flip: bool = True  # PF-Pascal trn: mirror pairs with flip = 1
    max_kps: int = 0  # keypoints per pair used in the loss (0: all)
    train_split: str = "trn"
    val_split: str = "val"
    device: str = "auto"
    dtype: str = "auto"  # weights: auto (bf16 on CUDA, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    workers: int = 4  # loader threads decoding, warping and resizing ahead
    cache_dir: str = ""  # keep VAE posteriors and DINOv2 tokens here too, for later runs
    store_gb: float = 8.0  # memory for VAE posteriors and DINOv2 tokens (all of SPair-71k trn: about 2 GB)
    compile: str = "auto"  # torch.compile the early-exit UNet and the VAE: auto (on CUDA) | on | off

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise Sd4MatchError(f"unknown training setting {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**d)


_PAPER = dict(timestep=261, up_block=1, ensemble=1, temperature=0.04, lr=1e-2, lr_linear=1e-3, batch_size=9, val_every=-1, val_rule="nn", val_pairs=0)
_EPOCHS = {"spair": 5, "pfpascal": 90}  # = 29.6k and 29.4k steps of 9 pairs
#: The paper's settings (DESIGN.md), one per prompt kind and training set: Adam at a constant
#: lr, batch 9, 5 epochs of SPair-71k or 90 of PF-Pascal, model selection once per epoch by
#: nearest-neighbour PCK@0.1 on the whole val split (sd4match protocol, per image).
PRESETS: dict[str, dict[str, Any]] = {
    f"{kind}-{ds}": {**_PAPER, "prompt": kind, "dataset": ds, "epochs": _EPOCHS[ds]} for kind in ("single", "category", "cpm") for ds in ("spair", "pfpascal")
}


# ------------------------------------------------------------------------------ checkpoints
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, prompt, optimizer, state: dict) -> Path:
    """Write ``checkpoints/step-XXXXXXX`` atomically: a temporary folder, fsync, rename."""
    from safetensors.torch import save_file

    ckpts = folder / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:07d}"
    tmp = ckpts / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"prompt.{k}": v.detach().cpu().contiguous() for k, v in prompt.state_dict().items()}
    osd = optimizer.state_dict()
    for idx, st in osd["state"].items():
        for name, val in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {**state, "step": step, "param_groups": osd["param_groups"], "rng": {"numpy": _np_state(), "python": _py_state()}}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    hang_for_tests(folder, f"ckpt:{step}")  # fault injection for tests: a kill in the middle of a write
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckpts)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a crashed write are ignored)."""
    ckpts = Path(folder) / CKPT_DIR
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file() and (p / "state.safetensors").is_file())


def prune_checkpoints(folder: Path, keep: int) -> None:
    ckpts = Path(folder) / CKPT_DIR
    for p in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpts.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, prompt, optimizer) -> dict:
    from safetensors.torch import load

    try:
        tensors = load((path / "state.safetensors").read_bytes())
        meta = json.loads((path / "state.json").read_text())
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read checkpoint ({first_line(e)})") from None
    try:
        prompt.load_state_dict({k[len("prompt."):]: v for k, v in tensors.items() if k.startswith("prompt.")}, strict=True)
    except RuntimeError as e:
        raise Sd4MatchError(f"{path}: does not fit this prompt ({str(e).splitlines()[-1].strip()})") from None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(_np_unstate(meta["rng"]["numpy"]))
    random.setstate(_py_unstate(meta["rng"]["python"]))
    return meta


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_unstate(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def _py_unstate(s):
    return (s[0], tuple(s[1]), s[2])


# ------------------------------------------------------------------------------ data order
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).permutation(n)


def batch_indices(n: int, seed: int, step: int, batch: int) -> list[int]:
    """The pairs of optimiser step ``step`` (0-based): consecutive slices of per-epoch permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        take = min(batch - len(out), n - pos)
        out.extend(order[pos : pos + take].tolist())
    return out


def step_generator(device, seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1))


# ------------------------------------------------------------------------------ the loop
class Trainer:
    """Holds the frozen models, the prompt, the optimiser and the data of one run."""

    def __init__(self, cfg: TrainConfig, out: str | Path, *, featurizer=None, dino=None, progress: bool = True):
        from sd4match.features import DinoFeaturizer, load_featurizer
        from sd4match.prompts import make_prompt
        from sd4match.runtime import distributed_rank_world, pick_device, pick_dtype

        self.cfg, self.out, self.progress = cfg, Path(out), progress
        # data parallel under `accelerate launch` / torchrun: the micro-batches of each optimiser
        # step are dealt out across processes and the prompt's gradients summed (all-reduce)
        self.rank, self.world = distributed_rank_world()
        if cfg.batch_size % cfg.micro_batch:
            raise Sd4MatchError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch {cfg.micro_batch}")
        dev = pick_device(cfg.device)
        wdt = pick_dtype(cfg.dtype, dev) if cfg.amp_dtype is None else torch.float32
        self.feat = featurizer or load_featurizer(cfg.model, timestep=cfg.timestep, up_block=cfg.up_block, ensemble=cfg.ensemble,
                                                  resolution=cfg.resolution, amp_dtype=cfg.amp_dtype).to(dev, wdt)
        if not hasattr(self.feat, "posterior"):
            raise Sd4MatchError(f"{cfg.model}: prompts are learned for Stable Diffusion (or SD+DINOv2) models, not {self.feat.model_id}")
        self.feat.reconfigure(timestep=cfg.timestep, up_block=cfg.up_block, ensemble=cfg.ensemble, resolution=cfg.resolution, amp_dtype=cfg.amp_dtype,
                              compile=cfg.compile == "on" or (cfg.compile == "auto" and torch.device(dev).type == "cuda"))
        ds = open_dataset(cfg.dataset, cfg.root)
        self.train_pairs = ds.pairs(cfg.train_split, apply_flip=True) if cfg.apply_flip and cfg.dataset == "pfpascal" else ds.pairs(cfg.train_split)
        self.train_pairs = [r for r in self.train_pairs if r.n_points > 0]
        if not self.train_pairs:
            raise Sd4MatchError(f"{cfg.root}: no training pairs with keypoints in split {cfg.train_split!r}")
        self._ds = ds
        self._val_pairs: list | None = None
        self.dino = None
        kw: dict[str, Any] = {}
        if cfg.prompt == "cpm":
            self.dino = dino or DinoFeaturizer.from_pretrained(cfg.dino).to(dev, wdt)
            kw = {"dino_dim": self.dino.feature_dim, "n_patches": self.dino.grid_size[0] * self.dino.grid_size[1], "dino_model": self.dino.model_id}
        cats = sorted({r.category for r in self.train_pairs})
        self.prompt = make_prompt(cfg.prompt, self.feat, categories=cats, seed=cfg.seed, **kw).to(dev)
        self.prompt.config.model, self.prompt.config.timestep, self.prompt.config.up_block = self.feat.model_id, cfg.timestep, cfg.up_block
        if cfg.prompt == "cpm":
            linear = {id(p) for p in self.prompt.linear_parameters()}
            groups = [{"params": [p for p in self.prompt.parameters() if id(p) not in linear], "lr": cfg.lr},
                      {"params": self.prompt.linear_parameters(), "lr": cfg.lr_linear}]
        else:
            groups = [{"params": list(self.prompt.parameters()), "lr": cfg.lr}]
        self.opt = torch.optim.Adam(groups)
        # fp16 autocast needs loss scaling so that small prompt gradients do not underflow;
        # disabled (a pass-through) for fp32 and bf16
        kind = torch.device(dev).type
        self.scaler = torch.amp.GradScaler(kind, enabled=cfg.amp_dtype == "fp16" and kind == "cuda")
        self.step, self.best = 0, {"pck": -1.0, "step": -1}
        # VAE posteriors and DINOv2 tokens of every training picture, computed once
        self.store = Store(int(cfg.store_gb * (1 << 30)), cfg.cache_dir or None)
        self.frozen = Frozen(self.feat, dino=self.dino, store=self.store, seed=cfg.seed)
        self._loader = None

    # .................................................................... data
    def _micro_jobs(self, step: int):
        """(step, micro-batch index, records) of this process from ``step`` on."""
        cfg = self.cfg
        n_micro = cfg.batch_size // cfg.micro_batch
        while True:
            idx = batch_indices(len(self.train_pairs), cfg.seed, step, cfg.batch_size)
            for m in range(self.rank, n_micro, self.world):
                yield step, m, [self.train_pairs[i] for i in idx[m * cfg.micro_batch : (m + 1) * cfg.micro_batch]]
            step += 1

    def _load_pictures(self, recs) -> list[tuple[Picture, Picture]]:
        res = self.feat.resolution
        return [tuple(Picture(im).prepare(res) for im in load_pair_images(self.cfg.root, r)) for r in recs]

    def close_loader(self) -> None:
        """Stop the loader threads (they decode ahead; nothing may run on when the run ends)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None

    def next_micro(self, step: int, m: int):
        """The records and decoded pictures of micro-batch ``m`` of ``step``, made ahead by loader threads."""
        if self._loader is None or self._loader_step != (step, m):
            self.close_loader()
            self._loader = prefetch(self._micro_jobs(step), lambda job: self._load_pictures(job[2]), workers=self.cfg.workers, ahead=2 * max(1, self.cfg.batch_size // self.cfg.micro_batch))
        (s, mm, recs), pics = next(self._loader)
        assert (s, mm) == (step, m)
        nxt = mm + self.world
        self._loader_step = (s, nxt) if nxt < self.cfg.batch_size // self.cfg.micro_batch else (s + 1, self.rank)
        if isinstance(pics, BaseException):
            self._loader = None
            raise pics
        return recs, pics

    # .................................................................... one step
    def micro_loss(self, recs, gen, pics=None) -> torch.Tensor:
        """Loss of a micro-batch of pairs (mean over pairs of each pair's loss)."""
        cfg, dev = self.cfg, self.feat.device
        if pics is None:
            pics = self._load_pictures(recs)
        src, trg = [a for a, _ in pics], [b for _, b in pics]
        batch: dict[str, Any] = {"categories": [r.category for r in recs]}
        if self.dino is not None:
            batch["dino_src"], batch["dino_trg"] = self.frozen.tokens(src), self.frozen.tokens(trg)
        emb = self.prompt(batch)
        fs, ft = self.frozen.pair_features(src, trg, emb, grad=True, generator=gen)
        n = max(r.n_points for r in recs) if not cfg.max_kps else min(cfg.max_kps, max(r.n_points for r in recs))
        sc = torch.zeros(len(recs), n, 2, device=dev)
        tc = torch.zeros(len(recs), n, 2, device=dev)
        valid = torch.zeros(len(recs), n, dtype=torch.bool, device=dev)
        for i, r in enumerate(recs):
            k = min(n, r.n_points)
            sc[i, :k] = torch.as_tensor(self.feat.pixel_to_cell(r.src_kps[:k], r.src_size), dtype=torch.float32)
            tc[i, :k] = torch.as_tensor(self.feat.pixel_to_cell(r.trg_kps[:k], r.trg_size), dtype=torch.float32)
            valid[i, :k] = True
        corr = point_correlation(fs, ft, sc)
        return gaussian_window_ce(corr, tc, valid, temperature=cfg.temperature, size=cfg.window, sigma=cfg.sigma)

    def train_step(self) -> float:
        cfg = self.cfg
        self.prompt.train()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        n_micro = cfg.batch_size // cfg.micro_batch
        for m in range(self.rank, n_micro, self.world):  # this process's share of the step's micro-batches
            recs, pics = self.next_micro(self.step, m)  # the loader's (step, micro-batch) is checked there
            loss = self.micro_loss(recs, step_generator(self.feat.device, cfg.seed, self.step, m), pics) / n_micro
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        if self.world > 1:
            total = self._all_reduce_grads(total)
        self.scaler.step(self.opt)  # skips the step if fp16 gradients overflowed (same decision on every process)
        self.scaler.update()
        self.step += 1
        return total

    def _all_reduce_grads(self, loss: float) -> float:
        """Sum gradients and loss over processes; every process then takes the same Adam step.
        A parameter that no process used keeps ``grad = None`` (Adam skips it, as in one process)."""
        import torch.distributed as dist

        params = [p for g in self.opt.param_groups for p in g["params"]]
        used = torch.tensor([float(p.grad is not None) for p in params] + [loss], dtype=torch.float64, device=self.feat.device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(used)
        dist.all_reduce(flat)
        off = 0
        for p, u in zip(params, used[:-1].tolist()):
            n = p.numel()
            p.grad = flat[off : off + n].view_as(p).to(p.dtype).clone() if u > 0 else None
            off += n
        return float(used[-1])

    # .................................................................... validation
    @property
    def val_pairs(self) -> list:
        if self._val_pairs is None:
            recs = self._ds.pairs(self.cfg.val_split)
            self._val_pairs = recs[: self.cfg.val_pairs] if self.cfg.val_pairs else recs
        return self._val_pairs

    @property
    def total_steps(self) -> int:
        """``steps``, or with ``epochs`` > 0: ceil(epochs x training pairs / batch)."""
        if self.cfg.epochs and self.cfg.epochs > 0:
            return math.ceil(self.cfg.epochs * len(self.train_pairs) / self.cfg.batch_size)
        return self.cfg.steps

    def validates_after(self, step: int) -> bool:
        """Whether validation runs after optimiser step ``step`` (1-based count of steps done)."""
        every = self.cfg.val_every
        if every == 0:
            return False
        if every > 0:
            return step % every == 0
        n, b = len(self.train_pairs), self.cfg.batch_size  # once per epoch: when this step used an epoch's last pair
        return (step * b) // n > ((step - 1) * b) // n or step == self.total_steps

    def validate(self) -> float:
        """PCK@0.1 per image, sd4match protocol, with ``val_rule`` (official: nn), on the validation pairs."""
        cfg = self.cfg
        self.prompt.eval()
        ens = self.feat.config.ensemble
        self.feat.reconfigure(ensemble=cfg.val_ensemble)
        try:
            ecfg = EvalConfig(cfg.dataset, cfg.root, cfg.val_split, rule=cfg.val_rule, seed=cfg.seed, workers=cfg.workers)
            mine = self.val_pairs[self.rank :: self.world]
            frozen = Frozen(self.feat, dino=self.dino, store=self.store, seed=cfg.seed)  # posteriors and tokens shared with training
            preds = {}
            for pid, kps in predict_pairs(self.feat, self.prompt, mine, cfg.root, ecfg, frozen=frozen, progress=False):
                if isinstance(kps, BaseException):
                    raise kps
                preds[pid] = kps
            if self.world > 1:
                preds = gather_dicts(preds)
        finally:
            self.feat.reconfigure(ensemble=ens)
            self.store.drop("features")  # this prompt's validation maps will not be asked for again
        return score(self.val_pairs, preds, protocol="sd4match", alphas=[0.1])["per_image"]["all"]["0.1"]

    # .................................................................... run
    def state(self) -> dict:
        return {"best": self.best, "config": asdict(self.cfg), "grad_scaler": self.scaler.state_dict()}

    def resume(self) -> bool:
        """Load the newest readable checkpoint (a damaged one is skipped with a warning naming
        it); False when there is none."""
        import warnings

        for ckpt in reversed(list_checkpoints(self.out)):
            try:
                meta = read_checkpoint_meta(ckpt)
            except Sd4MatchError as e:
                warnings.warn(f"{e}; falling back to the checkpoint before it", stacklevel=2)
                continue
            mine, theirs = _resumable(asdict(self.cfg)), _resumable(meta["config"])
            if mine != theirs:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise Sd4MatchError(f"{ckpt}: was written with other settings ({', '.join(diff)}); use another --out or the same settings")
            if int(meta["step"]) > self.total_steps:
                raise Sd4MatchError(f"{ckpt}: the run is already at step {meta['step']}, past the {self.total_steps} asked for")
            try:
                meta = load_checkpoint(ckpt, self.prompt, self.opt)
            except Sd4MatchError as e:
                warnings.warn(f"{e}; falling back to the checkpoint before it", stacklevel=2)
                continue
            self.step, self.best = int(meta["step"]), meta["best"]
            if meta.get("grad_scaler"):
                self.scaler.load_state_dict(meta["grad_scaler"])
            return True
        return False

    def run(self, *, resume: bool = False) -> Path:
        from tqdm import tqdm

        cfg, out = self.cfg, self.out
        lead = self.rank == 0  # only the first process writes; all of them train
        if self.world > 1:  # every process has checked the run folder before the first one writes into it
            import torch.distributed as dist

            dist.barrier()
        if not resume and list_checkpoints(out):
            raise Sd4MatchError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out")
        if resume and not self.resume():
            raise Sd4MatchError(f"{out}: no readable checkpoint to resume from; start the run again with --resume-or-start")
        if lead and resume:
            _cut_log(out / "scalars.jsonl", self.step)  # the steps after the checkpoint are done again: logged once
        log = tb = None
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            from sd4match.fileio import atomic_write_text

            atomic_write_text(out / "config.json", json.dumps({**asdict(cfg), "git_sha": git_sha(), "processes": self.world}, indent=2))
            log = open(out / "scalars.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in the finally below)
            tb = _tensorboard(out)
        total = self.total_steps
        bar = tqdm(total=total, initial=self.step, unit="step", desc="train", disable=not (self.progress and lead))
        t0, n0 = time.perf_counter(), self.step
        try:
            while self.step < total:
                loss = self.train_step()
                rate = (self.step - n0) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rate:.2f}")
                bar.update(1)
                rec = {"step": self.step, "loss": loss, "pairs_per_s": rate}
                if self.validates_after(self.step) and self.val_pairs:
                    pck = self.validate()
                    rec["val_pck@0.1"] = pck
                    if pck > self.best["pck"]:
                        self.best = {"pck": pck, "step": self.step}
                        if lead:
                            self.prompt.save(out / "best", dataset=cfg.dataset, split=cfg.train_split, step=self.step, val_pck=pck)
                if not lead:
                    continue
                log.write(json.dumps(rec) + "\n")
                log.flush()
                hang_for_tests(out, f"step:{self.step}")
                if tb:
                    for k, v in rec.items():
                        if k != "step":
                            tb.add_scalar(k.replace("@", "_at_"), v, self.step)
                if self.step % cfg.ckpt_every == 0 or self.step == total:
                    save_checkpoint(out, self.step, self.prompt, self.opt, self.state())
                    prune_checkpoints(out, cfg.keep_checkpoints)
        finally:
            bar.close()
            self.close_loader()
            if log:
                log.close()
            if tb:
                tb.close()
        if lead:
            self.prompt.save(out / "last", dataset=cfg.dataset, split=cfg.train_split, step=self.step)
            if self.best["step"] < 0:  # never validated: the last prompt is the one to use
                self.prompt.save(out / "best", dataset=cfg.dataset, split=cfg.train_split, step=self.step)
        return out


#: settings that may change between a run and its resumption: how long it runs and how it is fed
_VOLATILE = ("steps", "epochs", "workers", "cache_dir", "store_gb", "compile", "ckpt_every", "keep_checkpoints", "device")
RUN_FILES = ("config.json", "scalars.jsonl", CKPT_DIR, "best", "last", "tb")


def _resumable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _VOLATILE}


def read_checkpoint_meta(path: Path) -> dict:
    """A checkpoint's ``state.json``, checked to load; one-line error otherwise."""
    try:
        meta = json.loads((path / "state.json").read_text())
        int(meta["step"]), meta["config"]
    except Exception as e:
        raise Sd4MatchError(f"{path}: cannot read checkpoint ({first_line(e)})") from None
    return meta


def check_run_folder(out: str | Path, *, resume: bool, resume_or_start: bool) -> bool:
    """Whether to resume the run in ``out``; refuses what would mix two runs.

    - ``resume``: there must be a checkpoint (else: say so, suggest --resume-or-start);
    - ``resume_or_start``: resume if there is a checkpoint, else start afresh (an earlier
      attempt's log, killed before its first checkpoint, is replaced);
    - neither: ``out`` must not hold an earlier run's files.
    """
    out = Path(out)
    has_ckpt = bool(list_checkpoints(out))
    if resume:
        if not has_ckpt:
            raise Sd4MatchError(f"{out}: no checkpoint to resume from (the run stopped before its first one); use --resume-or-start to start it again")
        return True
    if resume_or_start:
        if not has_ckpt:
            for name in ("scalars.jsonl", "config.json"):
                (out / name).unlink(missing_ok=True)
        return has_ckpt
    earlier = [n for n in RUN_FILES if (out / n).exists()]
    if earlier:
        raise Sd4MatchError(f"{out}: holds an earlier run's files ({', '.join(earlier)}); pass --resume or --resume-or-start to continue it, "
                            "or choose another --out")
    return False


def _cut_log(path: Path, step: int) -> None:
    """Keep the lines of ``scalars.jsonl`` up to ``step`` (the resumed run logs the rest again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by a kill
    from sd4match.fileio import atomic_write_text

    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional; scalars.jsonl always holds the same numbers
        return None
    return SummaryWriter(str(out / "tb"))


def load_config(preset: str | None = None, yaml_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Preset, then YAML, then explicit overrides (None values are ignored)."""
    d: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise Sd4MatchError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        d.update(PRESETS[preset])
    if yaml_file:
        import yaml

        try:
            y = yaml.safe_load(Path(yaml_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise Sd4MatchError(f"{yaml_file}: cannot read settings ({e})") from None
        if not isinstance(y, dict):
            raise Sd4MatchError(f"{yaml_file}: expected a mapping of settings")
        d.update(y)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "steps" in given and "epochs" not in given:  # an explicit step count replaces a preset's epochs
        d["epochs"] = 0
    d.update(given)
    return TrainConfig.from_dict(d)
