"""``sd4match train``: learn a prompt for matching, resumable and reproducible.

One readable loop (nanoGPT style): a frozen featurizer, a prompt, the Gaussian-window
cross-entropy, Adam, gradient accumulation to the effective batch, validation by
PCK@0.1 with the best prompt kept.

Reproducible by construction: the data order of epoch e is a permutation drawn from
(seed, e); every random draw of a training step (latent sample, noise) comes from a
generator seeded by (seed, step, micro-batch). A resumed run therefore continues
exactly where an uninterrupted one would be. Checkpoints (``sd4match.checkpoint``) are
written into a temporary folder, fsynced and renamed; the last two are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sd4match.batching import Batcher, Picture, dino_part, prefetch
from sd4match.checkpoint import CKPT_DIR, list_checkpoints, load_checkpoint, prune_checkpoints, read_checkpoint_meta, save_checkpoint
from sd4match.config import TRAIN_PRESETS, MatchConfig, TrainConfig, compile_choice, kernel_choice, load_train_config
from sd4match.data import dataset_options, open_dataset
from sd4match.data.records import limit_pairs, limit_record, limit_rule_changed
from sd4match.errors import RunStopped, Sd4MatchError, Sd4MatchWarning, first_line
from sd4match.evaluate import check_same_weights, predict_pairs, weights_record
from sd4match.features import DinoFeaturizer, load_featurizer
from sd4match.fileio import atomic_write_text
from sd4match.loss import gaussian_window_ce
from sd4match.matching import point_correlation
from sd4match.metrics import score
from sd4match.features.adapters import Adapter, AdapterConfig
from sd4match.prompts import Prompt, make_prompt, parse_prompt, prompt_class, resolve_prompt
from sd4match.prompts.base import update_training_record
from sd4match.runtime import StopRequest, distributed_rank_world, gather_dicts, git_sha, hang_for_tests, peak_memory_mb, pick_device, pick_dtype, run_lock
from sd4match.store import Store
from sd4match.viz import plot_training

__all__ = ["PRESETS", "TrainConfig", "Trainer", "batch_indices", "build_optimizer", "check_run_folder", "load_config"]

#: The paper's settings, one per prompt kind and training set (``sd4match.config.TRAIN_PRESETS``).
PRESETS = TRAIN_PRESETS
#: the official datasets clamp training keypoints this far inside the working frame (spair.py:111-112)
TARGET_EPS = 1e-4
load_config = load_train_config


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


def clamp_to_frame(kps, size, resolution: int, eps: float = TARGET_EPS) -> np.ndarray:
    """Keypoints clamped as the official datasets clamp training targets: into
    [eps, R - 1 - eps] of the R x R working frame (x' = x * R / W), returned in pixels.

    A point on the image border (x = W) would otherwise put its window centre on the grid's
    edge, where the loss masks it out.
    """
    xy = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    scale = np.array([resolution / size[0], resolution / size[1]])
    return np.clip(xy * scale, eps, resolution - 1 - eps) / scale


def select_categories(records, cfg: TrainConfig, split: str) -> list:
    """The records of the categories ``cfg`` trains on (``categories``, minus
    ``exclude_categories``); a name the split does not have is an error naming those it has."""
    known = sorted({r.category for r in records})
    for name in (*cfg.categories, *cfg.exclude_categories):
        if name not in known:
            raise Sd4MatchError(f"category {name!r} is not in {cfg.dataset} {split}; its categories: {', '.join(known)}")
    keep = set(cfg.categories or known) - set(cfg.exclude_categories)
    return [r for r in records if r.category in keep]


def step_generator(device, seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1))


def build_optimizer(prompt: Prompt, cfg: TrainConfig, adapter=None) -> torch.optim.Adam:
    """Adam without weight decay at a constant learning rate, over the groups the prompt
    declares (``Prompt.param_groups``: the CPM's linear layers at ``lr_linear``) when it is
    learned, and the adapter's tensors at ``lr_adapter``."""
    groups = []
    if cfg.adapt.startswith("prompt"):
        groups = [g for g in prompt.param_groups(cfg.lr, cfg.lr_linear) if g["params"]]
    if adapter is not None:
        groups.append({"params": list(adapter.parameters()), "lr": cfg.lr_adapter})
    return torch.optim.Adam(groups)


def unused_settings(cfg: TrainConfig) -> list[str]:
    """The settings given another value than their default that this run never reads, as
    flags (``--lora-rank 8`` without ``--adapt lora``; ``--cpm-input cls`` for a single
    prompt): a run that silently trained something else than was meant costs hours."""
    parts = set(cfg.adapt.split("+"))
    learns_prompt = "prompt" in parts
    cpm = learns_prompt and prompt_class(cfg.prompt).needs_dino
    used = {"prompt": learns_prompt, "lora_rank": "lora" in parts, "lora_alpha": "lora" in parts, "lora_targets": "lora" in parts, "finetune_blocks": "finetune" in parts,
            "lr_adapter": parts != {"prompt"}, "fixed_prompt": not learns_prompt, "lr": learns_prompt, "lr_linear": cpm,
            "cpm_input": cpm, "global_tokens": cpm, "cond_tokens": cpm, "cpm_plain": cpm, "dino": cpm or parse_prompt(cfg.fixed_prompt).needs_dino}
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in used}
    return [f"--{k.replace('_', '-')}" for k, reads in used.items() if not reads and getattr(cfg, k) != default[k]]


def trainable_count(prompt: Prompt, adapter=None) -> int:
    """Parameters a run trains: the prompt's (when learned) and the adapter's."""
    return sum(p.numel() for p in prompt.parameters() if p.requires_grad) + (adapter.trainable_count() if adapter is not None else 0)


class RunLog:
    """``scalars.jsonl`` (one JSON line a step, flushed) and, when tensorboard is installed,
    the same numbers under ``tb/``. Only the first process writes; the others get a log
    that writes nothing."""

    def __init__(self, out: Path, *, write: bool):
        self.fh = open(out / "scalars.jsonl", "a", encoding="utf-8") if write else None  # noqa: SIM115 (closed by close())
        self.tb = _tensorboard(out) if write else None

    def write(self, rec: dict) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(k.replace("@", "_at_"), v, rec["step"])

    def close(self) -> None:
        for h in (self.fh, self.tb):
            if h is not None:
                h.close()


#: a running training redraws curves.png at a validation when it is older than this (seconds);
#: the end of a run, and a stop, always draw it
CURVES_EVERY_S = 60.0


def draw_curves(out: Path, title: str, validation: str) -> Path | None:
    """``out/curves.png`` from ``out/scalars.jsonl`` (the whole run, resumed parts included).
    A picture that cannot be drawn (a full disk, a broken matplotlib) is a warning: it never
    stops the training it shows."""
    log = out / "scalars.jsonl"
    try:
        records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()] if log.is_file() else []
        return plot_training(records, out / "curves.png", title=title, validation=validation)
    except Exception as e:  # noqa: BLE001 (a picture of the run is worth less than the run)
        warnings.warn(f"{out / 'curves.png'}: not drawn ({first_line(e)}); the run goes on, scalars.jsonl holds its numbers", Sd4MatchWarning,
                      stacklevel=2)
        return None


# ------------------------------------------------------------------------------ the loop
class Trainer:
    """Holds the frozen models, the prompt, the optimiser and the data of one run.

    Args:
        cfg: the run's settings.
        out: the run folder.
        featurizer, dino: already loaded models (default: loaded from ``cfg``).
    """

    def __init__(self, cfg: TrainConfig, out: str | Path, *, featurizer=None, dino=None, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        # data parallel under `accelerate launch` / torchrun: the micro-batches of each optimiser
        # step are dealt out across processes and the prompt's gradients summed (all-reduce)
        self.rank, self.world = distributed_rank_world()
        self.learns_prompt = cfg.adapt.startswith("prompt")
        self.adapter_kind = cfg.adapt.split("+")[-1] if cfg.adapt != "prompt" else None  # lora | finetune | None
        kind = prompt_class(cfg.prompt) if self.learns_prompt else parse_prompt(cfg.fixed_prompt).prompt_class
        if self.learns_prompt and not kind.learned:
            raise Sd4MatchError(f"prompt {cfg.prompt!r} is not learned; train one of the learned kinds")
        # 1. the data, first: a category that is not there, or none left, is named before any model loads
        self._ds = open_dataset(cfg.dataset, cfg.root, **dataset_options(cfg))
        every = [r for r in self._ds.pairs(cfg.train_split, apply_flip=cfg.apply_flip) if r.n_points > 0]
        self.train_pairs = select_categories(every, cfg, cfg.train_split)
        if not self.train_pairs:
            left = " after --categories / --exclude-categories" if cfg.categories or cfg.exclude_categories else ""
            raise Sd4MatchError(f"{cfg.root}: no training pairs with keypoints in split {cfg.train_split!r}{left}")
        self._val_pairs: list | None = None
        # 2. the frozen models
        dev = pick_device(cfg.device)
        wdt = pick_dtype(cfg.dtype, dev) if cfg.amp_dtype is None else torch.float32
        self.feat = featurizer or load_featurizer(cfg.model, timestep=cfg.timestep, up_block=cfg.up_block, ensemble=cfg.ensemble, noise_schedule=cfg.noise_schedule,
                                                  resolution=cfg.resolution, amp_dtype=cfg.amp_dtype).to(dev, wdt)
        if not (self.feat.takes_prompt and self.feat.has_posterior):
            raise Sd4MatchError(f"{cfg.model}: prompts are learned for Stable Diffusion (or SD+DINOv2) models, not {self.feat.model_id}")
        compiled, compile_mode = compile_choice(cfg.compile, torch.device(dev).type)
        self.feat.reconfigure(timestep=cfg.timestep, up_block=cfg.up_block, ensemble=cfg.ensemble, resolution=cfg.resolution, amp_dtype=cfg.amp_dtype,
                              noise_schedule=cfg.noise_schedule,
                              compile=compiled, compile_mode=compile_mode, **kernel_choice(cfg, torch.device(dev).type))
        self.dino = (dino or DinoFeaturizer.from_pretrained(cfg.dino, pos=cfg.dino_pos).to(dev, wdt)) if kind.needs_dino else None
        # 3. the prompt and its optimiser
        kw: dict[str, Any] = {}
        if self.dino is not None:
            kw = {"dino_dim": self.dino.feature_dim, "n_patches": self.dino.grid_size[0] * self.dino.grid_size[1], "dino_model": self.dino.model_id,
                  "cpm_input": cfg.cpm_input, "n_global": cfg.global_tokens, "n_cond": cfg.cond_tokens, "plain": cfg.cpm_plain}
        cats = sorted({r.category for r in self.train_pairs})
        if self.learns_prompt:
            self.prompt = make_prompt(cfg.prompt, self.feat, categories=cats, seed=cfg.seed, **kw).to(dev)
        else:  # the prompt the UNet is adapted under, fixed
            self.prompt = resolve_prompt(cfg.fixed_prompt, self.feat, dino=self.dino).to(dev).requires_grad_(False)
            self.feat.use_adapter(None)  # a prompt folder with an adapter of its own does not start this run
        self.prompt.config.model, self.prompt.config.timestep, self.prompt.config.up_block = self.feat.model_id, cfg.timestep, cfg.up_block
        self.prompt.config.training["categories"] = cats  # what it saw: evaluate reports seen and unseen categories apart
        # 3b. the UNet adapter (LoRA, fine-tuning): its own tensors, applied per call
        self.adapter = None
        if self.adapter_kind is not None:
            if not self.feat.adapts:
                raise Sd4MatchError(f"{cfg.model}: --adapt {cfg.adapt} adapts a Stable Diffusion UNet, which {self.feat.model_id} has not")
            acfg = AdapterConfig(self.adapter_kind, up_block=cfg.up_block, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=list(cfg.lora_targets),
                                 blocks=list(cfg.finetune_blocks), seed=cfg.seed, model=self.feat.model_id)
            self.adapter = Adapter(self.feat.unet, acfg).to(dev)
            self.feat.use_adapter(self.adapter)
        self.opt = build_optimizer(self.prompt, cfg, self.adapter)
        # fp16 autocast needs loss scaling so that small prompt gradients do not underflow;
        # disabled (a pass-through) for fp32 and bf16
        dev_type = torch.device(dev).type
        self.scaler = torch.amp.GradScaler(dev_type, enabled=cfg.amp_dtype == "fp16" and dev_type == "cuda")
        self.step, self.best = 0, {"pck": -1.0, "step": -1}
        #: the log record of a step whose validation a stop cut short: validated first when resumed
        self.pending: dict | None = None
        self.cost: dict[str, Any] = {"adapt": cfg.adapt, "trainable_params": trainable_count(self.prompt, self.adapter)}
        # 4. VAE posteriors and DINOv2 tokens of every training picture, computed once
        self.store = Store(int(cfg.store_gb * (1 << 30)), cfg.cache_dir or None)
        self.batcher = Batcher(self.feat, dino=self.dino, store=self.store, seed=cfg.seed)
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
        part = dino_part(self.prompt)  # DINOv2's input made here too, in the loader thread
        return [self.batcher.load_pair(self.cfg.root, r, dino_part=part) for r in recs]

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
        # the keypoints' cells, made on the CPU and sent in one copy that does not wait for the
        # GPU (a copy per pair into a device tensor waits for the work queued before it)
        n = max(r.n_points for r in recs) if not cfg.max_kps else min(cfg.max_kps, max(r.n_points for r in recs))
        cells = np.zeros((2, len(recs), n, 2), dtype=np.float32)
        valid = torch.zeros(len(recs), n, dtype=torch.bool)
        res = self.feat.resolution
        for i, r in enumerate(recs):
            k = min(n, r.n_points)
            cells[0, i, :k] = self.feat.pixel_to_cell(clamp_to_frame(r.src_kps[:k], r.src_size, res), r.src_size)
            cells[1, i, :k] = self.feat.pixel_to_cell(clamp_to_frame(r.trg_kps[:k], r.trg_size, res), r.trg_size)
            valid[i, :k] = True
        sc, tc = torch.from_numpy(cells).to(dev, non_blocking=True)
        valid = valid.to(dev, non_blocking=True)
        emb = self.prompt(self.batcher.prompt_batch(self.prompt, src, trg, [r.category for r in recs]))
        fs, ft = self.batcher.pair_features(src, trg, emb, grad=True, generator=gen)
        corr = point_correlation(fs, ft, sc, cfg.similarity)
        return gaussian_window_ce(corr, tc, valid, temperature=cfg.temperature, size=cfg.window, sigma=cfg.sigma)

    def train_step(self) -> float:
        """One optimiser step over ``batch_size`` pairs; returns its loss."""
        cfg = self.cfg
        self.prompt.train()
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.feat.device)
        n_micro = cfg.batch_size // cfg.micro_batch
        for m in range(self.rank, n_micro, self.world):  # this process's share of the step's micro-batches
            recs, pics = self.next_micro(self.step, m)  # the loader's (step, micro-batch) is checked there
            loss = self.micro_loss(recs, step_generator(self.feat.device, cfg.seed, self.step, m), pics) / n_micro
            self.scaler.scale(loss).backward()
            total += loss.detach()  # on the device: the next micro-batch is queued while this one's backward runs (fp64: the sum float() of each gave)
        total = float(total)
        if self.world > 1:
            total = self._all_reduce_grads(total)
        self.scaler.step(self.opt)  # skips the step if fp16 gradients overflowed (same decision on every process)
        self.scaler.update()
        self.step += 1
        return total

    def _all_reduce_grads(self, loss: float) -> float:
        """Sum gradients and loss over processes; every process then takes the same Adam step.
        A parameter that no process used keeps ``grad = None`` (Adam skips it, as in one process)."""
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
            recs = select_categories(self._ds.pairs(self.cfg.val_split), self.cfg, self.cfg.val_split)
            self._val_pairs = limit_pairs(recs, self.cfg.val_pairs)  # each category its share, as evaluate --limit
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

    def validate(self, stop: StopRequest | None = None) -> float | None:
        """PCK@0.1 per image, sd4match protocol, with ``val_rule`` (official: nn), on the validation
        pairs; None when ``stop`` is asked for before it ends (one process: a scheduler's grace
        period may be shorter than a validation)."""
        cfg = self.cfg
        self.prompt.eval()
        ens = self.feat.config.ensemble
        self.feat.reconfigure(ensemble=cfg.val_ensemble)
        try:
            mine = self.val_pairs[self.rank :: self.world]
            batcher = Batcher(self.feat, dino=self.dino, store=self.store, seed=cfg.seed)  # posteriors and tokens shared with training
            preds = {}
            with contextlib.closing(predict_pairs(self.feat, self.prompt, mine, cfg.root, match=MatchConfig(cfg.val_rule, similarity=cfg.similarity),
                                                  workers=cfg.workers, batcher=batcher, progress=False)) as pairs:
                for pid, kps in pairs:
                    if isinstance(kps, BaseException):
                        raise kps
                    preds[pid] = kps
                    if stop is not None and stop.signal is not None:
                        return None
            if self.world > 1:
                preds = gather_dicts(preds)
        finally:
            self.feat.reconfigure(ensemble=ens)
            self.store.drop("features")  # this prompt's validation maps will not be asked for again
        return score(self.val_pairs, preds, protocol="sd4match", alphas=[0.1])["per_image"]["all"]["0.1"]

    def _validate_into(self, rec: dict, stop: StopRequest | None, log, lead: bool) -> None:
        """Validate after ``rec``'s step, keep the best prompt and log ``rec`` with the score;
        a validation ``stop`` cuts short leaves ``rec`` pending (checkpointed, validated on resume)."""
        pck = self.validate(stop)
        if pck is None:
            self.pending = rec
            return
        rec["val_pck@0.1"] = pck
        self.keep_if_best(pck)
        if lead:
            log.write(rec)

    def keep_if_best(self, pck: float) -> None:
        """Remember ``pck`` as the best so far if it is, and (first process) save the prompt as ``best/``."""
        if pck > self.best["pck"]:
            self.best = {"pck": pck, "step": self.step}
            if self.rank == 0:
                self.save_result(self.out / "best", val_pck=pck)

    # .................................................................... the run
    def state(self) -> dict:
        return {"best": self.best, "config": recorded_config(self.cfg), "grad_scaler": self.scaler.state_dict(),
                **({"pending": self.pending} if self.pending else {})}

    def checkpoint(self) -> Path:
        """Write a checkpoint of this step; keep the newest ``keep_checkpoints``."""
        path = save_checkpoint(self.out, self.step, self.prompt, self.opt, self.state(), extra=self._extra())
        prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path

    def _extra(self) -> dict:
        return {"adapter": self.adapter} if self.adapter is not None else {}

    def resume(self) -> bool:
        """Load the newest readable checkpoint (a damaged one is skipped with a warning naming
        it); False when there is none."""
        for ckpt in reversed(list_checkpoints(self.out)):
            try:
                meta = read_checkpoint_meta(ckpt)
            except Sd4MatchError as e:
                warnings.warn(f"{e}; falling back to the checkpoint before it", Sd4MatchWarning, stacklevel=2)
                continue
            mine, theirs = _resumable(recorded_config(self.cfg)), _resumable(meta["config"])
            if mine != theirs:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                why = limit_rule_changed(diff, "val_pairs_rule", "--val-pairs")
                raise Sd4MatchError(f"{ckpt}: was written with other settings ({', '.join(diff)}{why}); use another --out or the same settings")
            if int(meta["step"]) > self.total_steps:
                raise Sd4MatchError(f"{ckpt}: the run is already at step {meta['step']}, past the {self.total_steps} asked for")
            try:
                meta = load_checkpoint(ckpt, self.prompt, self.opt, extra=self._extra())
            except Sd4MatchError as e:
                warnings.warn(f"{e}; falling back to the checkpoint before it", Sd4MatchWarning, stacklevel=2)
                continue
            self.step, self.best, self.pending = int(meta["step"]), meta["best"], meta.get("pending")
            if meta.get("grad_scaler"):
                self.scaler.load_state_dict(meta["grad_scaler"])
            return True
        return False

    def open_run(self, resume: bool) -> None:
        """Start or resume the run in ``out``: refuse to mix two runs, load the newest good
        checkpoint, cut the log back to it, and (first process) write ``config.json``."""
        if self.world > 1:  # every process has checked the run folder before the first one writes into it
            dist.barrier()
        if not resume and list_checkpoints(self.out):
            raise Sd4MatchError(f"{self.out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out")
        if resume and not self.resume():
            raise Sd4MatchError(f"{self.out}: no readable checkpoint to resume from; start the run again with --resume-or-start")
        if resume:
            check_same_weights(self.out / "config.json")  # a download since the check before loading
        if self.rank == 0:
            if resume:
                # the steps after the checkpoint are done again: logged once (and its own step's line when its
                # validation was cut short: an extended run that resumes there again validates and logs it again)
                _cut_log(self.out / "scalars.jsonl", self.step - (self.pending is not None))
            self.out.mkdir(parents=True, exist_ok=True)
            self.write_config()

    def write_config(self) -> None:
        """``config.json``: the settings, the code, the hub weights' snapshots, and what the run
        costs (trainable parameters; after the run, seconds per step and peak memory)."""
        atomic_write_text(self.out / "config.json", json.dumps({**recorded_config(self.cfg), "git_sha": git_sha(), **weights_record(self.feat, self.dino),
                                                                "processes": self.world, "cost": self.cost}, indent=2))

    def run(self, *, resume: bool = False) -> Path:
        """Train to ``total_steps``; return the run folder (``best/`` and ``last/`` prompts in it).
        The folder is locked while it runs: a second run into it is refused in one line."""
        with run_lock(self.out, "training run"):
            return self._run(resume)

    def _run(self, resume: bool) -> Path:
        cfg, out, lead = self.cfg, self.out, self.rank == 0  # only the first process writes; all of them train
        self.open_run(resume)
        log = RunLog(out, write=lead)
        total = self.total_steps
        bar = tqdm(total=total, initial=self.step, unit="step", desc="train", disable=not (self.progress and lead))
        t0, n0 = time.perf_counter(), self.step
        drawn = t0  # when curves.png was last drawn
        try:
            with StopRequest() as stop:
                if self.pending:  # resumed at a step whose validation a stop cut short: that validation first
                    rec, self.pending = self.pending, None
                    self._validate_into(rec, None, log, lead)
                while self.step < total:
                    # one optimiser step
                    loss = self.train_step()
                    rate = (self.step - n0) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rate:.2f}")
                    bar.update(1)
                    rec = {"step": self.step, "loss": loss, "pairs_per_s": rate}
                    # validate (every process takes its share), keep the best prompt, log the step
                    if self.validates_after(self.step) and self.val_pairs:
                        self._validate_into(rec, stop if self.world == 1 else None, log, lead)
                        if lead and time.perf_counter() - drawn > CURVES_EVERY_S:  # a long run's progress, without TensorBoard
                            self.draw_curves()
                            drawn = time.perf_counter()
                    elif lead:
                        log.write(rec)
                    if lead:
                        hang_for_tests(out, f"step:{self.step}", until=lambda: stop.signal is not None)
                    # SIGTERM or Ctrl-C: every process stops after this step, the first keeps it
                    # (a validation it cut short is done when the run resumes, even after the last step)
                    stopping = stop.agreed(self.world, self.feat.device) and (self.step < total or self.pending is not None)
                    if lead and (self.step % cfg.ckpt_every == 0 or self.step == total or stopping):
                        self.checkpoint()
                    if stopping:
                        if lead:
                            self.save_result(out / "last")
                            self.draw_curves()
                        cut = " (its validation was cut short: it runs first when resumed)" if self.pending is not None else ""
                        raise RunStopped(f"{stop.signal} at step {self.step} of {total}{cut}: its checkpoint and last/ are in {out}; "
                                         "continue the run with --resume", stop.signal)
        finally:
            bar.close()
            self.close_loader()
            log.close()
        self.cost["seconds_per_step"] = (time.perf_counter() - t0) / max(1, self.step - n0)
        self.cost["peak_memory_mb"] = peak_memory_mb(self.feat.device)
        if lead:
            self.save_result(out / "last")
            if self.best["step"] < 0:  # never validated: the last prompt is the one to use
                self.save_result(out / "best")
            else:  # best/ was written at its step, before the run's time and memory were known
                update_training_record(out / "best", cost=dict(self.cost))
            self.write_config()
            self.draw_curves()
        return out

    def draw_curves(self) -> Path | None:
        """``curves.png``: the run's loss and validation scores so far, labelled by how they were scored."""
        cfg = self.cfg
        pairs = f"{len(self._val_pairs)} {cfg.val_split} pairs" if self._val_pairs is not None else f"{cfg.val_split} split"  # read when validated
        return draw_curves(self.out, f"{self.out.name}: {cfg.prompt} prompt, {cfg.dataset}/{cfg.train_split}, batch {cfg.batch_size}",
                           f"validation: {cfg.val_rule}, sd4match frame, {pairs}")

    def save_result(self, folder: Path, **extra) -> Path:
        """The prompt folder a run hands on: the prompt, the adapter (if any), what it cost."""
        cfg = self.cfg
        self.prompt.save(folder, dataset=cfg.dataset, split=cfg.train_split, step=self.step, adapt=cfg.adapt, cost=dict(self.cost),
                         **weights_record(self.feat, self.dino), **extra)
        if self.adapter is not None:
            self.adapter.save(folder)
        return folder


# ------------------------------------------------------------------------------ the run folder
#: settings that may change between a run and its resumption: how long it runs and how it is fed
_VOLATILE = ("steps", "epochs", "workers", "cache_dir", "store_gb", "compile", "channels_last", "attention", "cudnn_benchmark", "ckpt_every",
             "keep_checkpoints", "device")
RUN_FILES = ("config.json", "scalars.jsonl", CKPT_DIR, "best", "last", "tb", "curves.png")


def recorded_config(cfg: TrainConfig) -> dict:
    """``cfg`` as a run records it: validating on part of the val split also names how those
    pairs were picked (``val_pairs_rule``), so a run of another rule is not resumed."""
    return {**asdict(cfg), **limit_record(cfg.val_pairs, "val_pairs_rule")}


def _resumable(cfg: dict) -> dict:
    """The settings a resumed run must share; a setting newer than the checkpoint counts as
    its default (so runs of an earlier release resume)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **cfg}.items() if k not in _VOLATILE}


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
        check_same_weights(out / "config.json")
        return True
    if resume_or_start:
        if not has_ckpt:
            for name in ("scalars.jsonl", "config.json", "curves.png"):
                (out / name).unlink(missing_ok=True)
        else:
            check_same_weights(out / "config.json")
        return has_ckpt
    earlier = [n for n in RUN_FILES if (out / n).exists()]
    log = out / "scalars.jsonl"
    if earlier and set(earlier) <= {"config.json", "scalars.jsonl"} and not (log.is_file() and log.stat().st_size):
        for name in earlier:  # a run that failed before its first step: nothing of it to keep
            (out / name).unlink()
        return False
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
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional; scalars.jsonl always holds the same numbers
        return None
    return SummaryWriter(str(out / "tb"))


