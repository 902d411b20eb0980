"""The frozen models' work, done once and in batches: what evaluate, train, validation,
match, transfer, serve and ``features`` ask of the featurizer and DINOv2.

A ``Picture`` is a decoded image with its content key; loader threads make them ahead of
the GPU (``prefetch``). ``Frozen`` answers, through one ``Store``:

- ``posteriors(pics)``: VAE posteriors (each picture's once);
- ``tokens(pics)``: DINOv2 patch tokens (each picture's once);
- ``features(pics, embeds, prompt_id)``: feature maps of pictures under a pair-independent
  prompt (each picture's once), computed in batches of ``max_batch // ensemble`` pictures;
- ``pair_features(src, trg, embeds)``: feature maps of pairs under per-pair prompts (CPM),
  ``max_batch // (2 x ensemble)`` pairs a UNet call.

Every picture's random draws come from a generator seeded by ``seed`` and its content.
With ``fixed_batches`` (evaluate, train) every call has a fixed shape: the VAE and DINOv2
take one picture a call (each picture runs through them once, ever), the UNet takes
``pictures_per_call`` pictures, the last call of a run padded with copies. A picture's
result then does not depend on which pictures it was batched with, bit for bit (a call's
kernels depend on its shape, not on its other rows), so sharded, resumed and
one-at-a-time runs agree exactly.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from sd4match.store import Store, image_key, seed_for, settings_key

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Picture:
    """A decoded RGB picture, its content key, and (once prepared) its pixels squashed to
    the featurizer's working resolution as uint8 (made in a loader thread)."""

    image: Image.Image
    key: str = ""
    resized: dict = field(default_factory=dict)  # resolution -> (3, R, R) uint8 tensor

    def __post_init__(self):
        if not self.key:
            self.key = image_key(self.image)

    def prepare(self, resolution: int | None) -> "Picture":
        """Squash to ``resolution`` (bilinear, as torchvision's Resize on PIL images) now."""
        if resolution and resolution not in self.resized:
            im = self.image.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
            self.resized[resolution] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        return self

    def tensor(self, resolution: int, device) -> torch.Tensor:
        """(3, R, R) fp32 in [0, 1] on ``device`` (uint8 travels, the float is made there)."""
        self.prepare(resolution)
        return self.resized[resolution].to(device, non_blocking=True).float() / 255.0


def prefetch(items: Iterable[T], fn: Callable[[T], R], *, workers: int = 4, ahead: int = 16) -> Iterator[tuple[T, R | BaseException]]:
    """``(item, fn(item))`` in order, computed by ``workers`` threads up to ``ahead`` items in
    advance. An exception is yielded in place of its result (the caller decides)."""

    def safe(x):
        try:
            return fn(x)
        except Exception as e:  # handed to the caller, who names the item
            return e

    if workers <= 0:
        for x in items:
            yield x, safe(x)
        return
    it = iter(items)
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sd4match-load")
    try:
        queue = [(x, ex.submit(safe, x)) for x in itertools.islice(it, ahead)]
        while queue:
            x, fut = queue.pop(0)
            for nxt in itertools.islice(it, 1):
                queue.append((nxt, ex.submit(safe, nxt)))
            yield x, fut.result()
    finally:  # also when the consumer stops early (generator closed): drop what is queued, wait for what runs
        ex.shutdown(wait=True, cancel_futures=True)


class Frozen:
    """The frozen featurizer (and DINOv2) behind one store.

    Args:
        featurizer: ``SDFeaturizer``, ``EffNetFeaturizer`` or ``DinoFeaturizer``.
        dino: the DINOv2 ``DinoFeaturizer`` for CPM prompts, or None.
        store: the ``Store`` (a fresh 2 GiB memory store when None).
        seed: base seed of every picture's random draws.
    """

    def __init__(self, featurizer, *, dino=None, store: Store | None = None, seed: int = 0, fixed_batches: bool = True, dino_batch: int = 16):
        self.featurizer, self.dino = featurizer, dino
        self.store = store if store is not None else Store()
        self.seed = seed
        self.fixed_batches = fixed_batches
        self.dino_batch = dino_batch
        self.calls: dict[str, list[int]] = {"posterior": [], "unet": [], "dino": []}  # pictures (VAE, DINOv2) or samples (UNet) per call

    @property
    def is_sd(self) -> bool:
        return hasattr(self.featurizer, "posterior")

    @property
    def device(self):
        return self.featurizer.device

    @property
    def resolution(self) -> int:
        return self.featurizer.resolution

    def pad(self, items: Sequence[T], n: int) -> list[T]:
        """``items`` padded to ``n`` with copies of the last one (with ``fixed_batches``)."""
        items = list(items)
        return items + [items[-1]] * (n - len(items)) if self.fixed_batches and 0 < len(items) < n else items

    def generators(self, pics: Sequence[Picture]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(seed_for(p.key, self.seed)) for p in pics]

    def batch_tensor(self, pics: Sequence[Picture]) -> torch.Tensor:
        return torch.stack([p.tensor(self.resolution, self.device) for p in pics])

    # ---------------------------------------------------------------- work done once per picture
    def _once(self, kind: str, pics: Sequence[Picture], settings: dict, batch: int, compute) -> dict[str, torch.Tensor]:
        """Each picture's ``kind`` entry from the store, the missing ones computed by
        ``compute(pictures) -> {name: (B, ...)}`` in calls of ``batch`` (1 with
        ``fixed_batches``); returns ``{name: (len(pics), ...)}`` in the order of ``pics``."""
        keys = [settings_key(p.key, settings) for p in pics]
        got = {k: self.store.get(kind, k, self.device) for k in dict.fromkeys(keys)}
        todo = [(k, p) for k, p in dict(zip(keys, pics)).items() if got[k] is None]
        step = 1 if self.fixed_batches else batch
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            out = compute([p for _, p in chunk])
            self.calls[kind].append(len(chunk))
            for j, (k, _) in enumerate(chunk):
                got[k] = {name: t[j : j + 1] for name, t in out.items()}
                self.store.put(kind, k, got[k])
        return {name: torch.cat([got[k][name] for k in keys]) for name in got[keys[0]]}

    def posteriors(self, pics: Sequence[Picture]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each picture's VAE posterior, (B, 4, h, w) fp32; each computed once."""

        def vae(batch):
            mean, std = self.featurizer.posterior(self.batch_tensor(batch))
            return {"mean": mean, "std": std}

        got = self._once("posterior", pics, self.featurizer.posterior_settings(), self.featurizer.config.vae_batch, vae)
        return got["mean"], got["std"]

    def tokens(self, pics: Sequence[Picture]) -> torch.Tensor:
        """DINOv2 patch tokens (B, P, C) fp32; each picture's computed once."""
        if self.dino is None:
            raise ValueError("no DINOv2 model was given")
        return self._once("dino", pics, self.dino.settings(), self.dino_batch,
                          lambda batch: {"tokens": self.dino.tokens([p.image for p in batch]).to(self.device)})["tokens"]

    # ---------------------------------------------------------------- feature maps
    def _run(self, pics: Sequence[Picture], embeds: torch.Tensor | None, *, grad: bool = False, generator=None) -> torch.Tensor:
        """Feature maps of ``pics`` in one featurizer call (``embeds``: (1 or B, 77, D))."""
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            if not self.is_sd:
                return self.featurizer([p.image for p in pics])
            post = self.posteriors(pics)
            gens = generator if generator is not None else self.generators(pics)
            self.calls["unet"].append(len(pics) * self.featurizer.config.ensemble)
            extra = {"pixels": self.batch_tensor(pics)} if getattr(self.featurizer, "needs_pixels", False) else {}
            return self.featurizer(None, posteriors=post, prompt_embeds=embeds, generator=gens, **extra)

    def pictures_per_call(self) -> int:
        """Pictures per UNet call: ``max_batch // ensemble`` (at least 1)."""
        if not self.is_sd:
            return getattr(self.featurizer.config, "max_batch", 16)
        c = self.featurizer.config
        return max(1, c.max_batch // c.ensemble)

    def feature_key(self, pic: Picture, prompt_id: str) -> str:
        """The store key of ``pic``'s map under a pair-independent prompt named ``prompt_id``."""
        return settings_key(pic.key, {"featurizer": self.featurizer.settings(), "prompt": prompt_id, "seed": self.seed})

    def stored_map(self, pic: Picture, prompt_id: str) -> torch.Tensor | None:
        hit = self.store.get("features", self.feature_key(pic, prompt_id), self.device)
        return None if hit is None else hit["features"]

    def compute_maps(self, pics: Sequence[Picture], embeds: Sequence[torch.Tensor | None], prompt_ids: Sequence[str]) -> list[torch.Tensor]:
        """Maps of up to ``pictures_per_call`` pictures in one UNet call (padded to it with
        ``fixed_batches``), each under its own (1, 77, D) prompt; stored under their keys."""
        n = self.pictures_per_call()
        if len(pics) > n:
            raise ValueError(f"{len(pics)} pictures for one call of {n}")
        idx = self.pad(range(len(pics)), n)
        emb = None if embeds[0] is None else torch.cat([embeds[i] for i in idx])
        maps = self._run([pics[i] for i in idx], emb)
        out = []
        for j, (p, pid) in enumerate(zip(pics, prompt_ids)):
            out.append(maps[j : j + 1])
            self.store.put("features", self.feature_key(p, pid), {"features": out[-1]})
        return out

    def features(self, pics: Sequence[Picture], embeds: torch.Tensor | None, prompt_id: str) -> list[torch.Tensor]:
        """(1, C, h, w) maps of ``pics`` under one pair-independent prompt, each computed once
        (``prompt_id`` names the prompt in the store key; ``embeds`` is (1, 77, D))."""
        got = {p.key: self.stored_map(p, prompt_id) for p in pics}
        todo = list({p.key: p for p in pics if got[p.key] is None}.values())
        n = self.pictures_per_call()
        for i in range(0, len(todo), n):
            chunk = todo[i : i + n]
            for p, m in zip(chunk, self.compute_maps(chunk, [embeds] * len(chunk), [prompt_id] * len(chunk))):
                got[p.key] = m
        return [got[p.key] for p in pics]

    def pairs_per_call(self) -> int:
        if not self.is_sd:
            return max(1, self.pictures_per_call() // 2)
        c = self.featurizer.config
        return max(1, c.max_batch // (2 * c.ensemble))

    def pair_features(self, src: Sequence[Picture], trg: Sequence[Picture], embeds: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of P pairs under per-pair prompts (``embeds``: (P, 77, D)) in one call: (P, C, h, w) x 2.
        (The caller pads the pairs, so that the prompt's own batch is fixed too.)"""
        p = len(src)
        emb2 = torch.cat([embeds, embeds]) if embeds.shape[0] > 1 else embeds
        maps = self._run([*src, *trg], emb2, **kw)
        return maps[:p], maps[p:]
