"""The frozen models' work, done once and in batches: the one owner of what evaluate, train,
validation, match, transfer, serve and ``features`` ask of the featurizer and DINOv2.

A ``Picture`` is a decoded image with its content key; loader threads make them ahead of
the GPU (``prefetch``). ``Batcher`` answers, through one ``Store``:

- ``posteriors(pics)``: VAE posteriors (each picture's once);
- ``tokens(pics)``: DINOv2 patch tokens (each picture's once);
- ``features(pics, embeds, prompt_id)``: feature maps of pictures under a pair-independent
  prompt (each picture's once), computed in batches of ``max_batch // ensemble`` pictures;
- ``pair_features(src, trg, embeds)``: feature maps of pairs under per-pair prompts (CPM),
  ``max_batch // (2 x ensemble)`` pairs a UNet call;
- ``pair_maps(prompt, a, b)``: the maps of one pair, per picture or per pair as the prompt
  declares (``Prompt.per_pair``): the only place that decision is made;
- ``stream(prompt, loaded, consume)``: evaluate's scheduler over a stream of pairs;
- ``prompt_id``, ``feature_key``, ``pair_keys``: the only recipe of the store's keys.

Every picture's random draws come from a generator seeded by ``seed`` and its content.
With ``fixed_batches`` (evaluate, train) every call has a fixed shape: the VAE takes
``vae_batch`` pictures a call, DINOv2 ``dino_batch`` and the UNet ``pictures_per_call``
pictures (each picture runs through the VAE and DINOv2 once, ever), a call with fewer
padded with copies of its last picture (``padded`` counts them). A picture's result then
does not depend on which pictures it was batched with, bit for bit (a call's kernels
depend on its shape, not on its other rows), so sharded, resumed and one-at-a-time runs
agree exactly. ``stream`` gathers the once-per-picture work of the pictures that wait
(``prepare``) until it fills whole VAE and DINOv2 calls, so that padding is rare: at the
end of a run, or when the bound on waiting pictures is reached.
"""

from __future__ import annotations

import itertools
import json
import threading
import weakref
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from sd4match.data import pair_sources
from sd4match.data.records import PairRecord
from sd4match.features.registry import weights_identity
from sd4match.pixels import to_rgb
from sd4match.prompts import Prompt, prompt_fingerprint
from sd4match.store import Store, image_key, owned, seed_for, settings_key

T = TypeVar("T")
R = TypeVar("R")


class Picture:
    """A picture, its content key, and (once prepared) its pixels squashed to the
    featurizer's working resolution as uint8 (made in a loader thread).

    Made from a decoded ``image`` (its key computed from the pixels), or lazily from a known
    ``key`` and ``decode``: the picture is then decoded only when its pixels are first
    needed (a stored run needs none)."""

    def __init__(self, image: Image.Image | None = None, key: str = "", *, decode: Callable[[], Image.Image] | None = None):
        if image is None and (decode is None or not key):
            raise ValueError("a Picture needs its image, or its key and how to decode it")
        self._image, self._decode = image, decode
        self.key = key or image_key(image)
        self.resized: dict = {}  # resolution -> (3, R, R) uint8 tensor
        self.inputs: dict[str, torch.Tensor] = {}  # a model's input made from the picture (DINOv2's crop), by the model's settings

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image, self._decode = self._decode(), None
        return self._image

    @property
    def decoded(self) -> bool:
        return self._image is not None

    def prepare(self, resolution: int | None) -> "Picture":
        """Squash to ``resolution`` (bilinear, as torchvision's Resize on PIL images) now."""
        if resolution and resolution not in self.resized:
            im = to_rgb(self.image).resize((resolution, resolution), Image.Resampling.BILINEAR)
            self.resized[resolution] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        return self

    def tensor(self, resolution: int, device) -> torch.Tensor:
        """(3, R, R) fp32 in [0, 1] on ``device`` (uint8 travels, the float is made there)."""
        self.prepare(resolution)
        return self.resized[resolution].to(device, non_blocking=True).float() / 255.0

    def input_for(self, name: str, make: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
        """The input ``make(image)`` of the model ``name`` names, made once (in a loader thread when asked there)."""
        got = self.inputs.get(name)
        if got is None:
            got = self.inputs[name] = make(self.image)
        return got


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


def per_pair(prompt: Prompt | None) -> bool:
    """Whether maps under ``prompt`` are made per pair (the prompt depends on both pictures)
    rather than once per picture: the one test of that decision."""
    return prompt is not None and prompt.per_pair


def dino_part(prompt: Prompt | None) -> str | None:
    """The DINOv2 tokens maps under ``prompt`` read (``patches`` or ``cls``), or None for a
    prompt that reads none: the one test of that decision."""
    return prompt.dino_part if prompt is not None and prompt.needs_dino else None


class Batcher:
    """The frozen featurizer (and DINOv2) behind one store.

    Args:
        featurizer: any ``Featurizer`` (SD, fused, effnet-lite0, DINOv2).
        dino: the DINOv2 ``DinoFeaturizer`` for prompts that need its tokens, or None.
        store: the ``Store`` (a fresh 2 GiB memory store when None).
        seed: base seed of every picture's random draws.
        fixed_batches: every call of a fixed size (evaluate, train: results independent of
            the batching, bit for bit); False: calls as large as the work at hand
            (interactive use).
        dino_batch: pictures per DINOv2 call (the VAE's: the featurizer's ``vae_batch``).
    """

    def __init__(self, featurizer, *, dino=None, store: Store | None = None, seed: int = 0, fixed_batches: bool = True, dino_batch: int = 16):
        self.featurizer, self.dino = featurizer, dino
        self.store = store if store is not None else Store()
        self.seed = seed
        self.fixed_batches = fixed_batches
        self.dino_batch = dino_batch
        self.calls: dict[str, list[int]] = {"posterior": [], "unet": [], "dino": []}  # pictures (VAE, DINOv2) or samples (UNet) per call, padding included
        self.padded: Counter[str] = Counter()  # padding copies: pictures (VAE, DINOv2) or samples (UNet)
        self.stream_peak: dict[str, int] = {}  # the last stream's largest held pictures and waiting pairs, and its early calls
        self._live: weakref.WeakValueDictionary[str, Picture] = weakref.WeakValueDictionary()  # decoded pictures someone still holds
        self._live_lock = threading.Lock()
        self._dino_name = json.dumps(dino.settings(), sort_keys=True) if dino is not None else ""
        self._made_by: dict[str, dict[str, str]] = {}

    @property
    def device(self):
        return self.featurizer.device

    def work_counts(self) -> dict[str, dict[str, int]]:
        """What the frozen models did: per model (``vae``, ``dino``, ``unet``) its calls, the
        pictures (UNet: samples) they carried, and how many of those were padding copies."""
        units = {"posterior": "vae", "dino": "dino", "unet": "unet"}
        return {units[k]: {"calls": len(v), "items": sum(v), "padded": self.padded[k]} for k, v in self.calls.items() if v}

    @property
    def resolution(self) -> int:
        return self.featurizer.resolution

    @property
    def picture_resolution(self) -> int | None:
        """The side pictures are squashed to before the model (featurizers with posteriors), else None."""
        return self.featurizer.resolution if self.featurizer.has_posterior else None

    def load_pair(self, root: str | Path, record: PairRecord,
                  need: Callable[[PairRecord, Picture, Picture], tuple[bool, bool]] | None = None, dino_part: str | None = None) -> tuple[Picture, Picture]:
        """A pair's two pictures, decoded and squashed for the model (in a loader thread).

        A picture whose file the store has named before (``Store.name``) is made lazily;
        ``need(record, src, trg)`` says which of those are needed now (decoded here), the
        others are decoded only if their pixels are asked for (a stored map needs none).
        A picture not named yet is decoded here, so that a bad file fails on its pair. A
        picture that another waiting pair holds decoded is that same ``Picture`` (decoded
        once however many pairs of the look-ahead read it). With ``dino_part``, a decoded
        picture whose DINOv2 tokens are not stored gets its DINOv2 input made here too."""
        pics = []
        sources = pair_sources(root, record)
        for source in sources:
            with self._live_lock:
                pic = self._live.get(source.identity)
            if pic is None:
                key = self.store.name(source.identity)
                if key is None:
                    pic = Picture(source.decode())
                    self.store.remember_name(source.identity, pic.key)
                else:
                    pic = Picture(key=key, decode=source.decode)
            pics.append(pic)
        src, trg = pics
        wanted = need(record, src, trg) if need is not None else (True, True)
        for p, source, w in zip(pics, sources, wanted):
            if w:
                p.image  # noqa: B018 - decode now, in this thread
                p.prepare(self.picture_resolution)
                if dino_part is not None and not self.has_work(p, [("dino", dino_part)]):
                    self.dino_input(p)
            if p.decoded:
                with self._live_lock:
                    self._live.setdefault(source.identity, p)
        return src, trg

    def pad(self, items: Sequence[T], n: int, kind: str = "", unit: int = 1) -> list[T]:
        """``items`` padded to ``n`` with copies of the last one (with ``fixed_batches``); the
        copies are counted in ``padded[kind]``, ``unit`` each (samples per picture)."""
        items = list(items)
        if not (self.fixed_batches and 0 < len(items) < n):
            return items
        if kind:
            self.padded[kind] += (n - len(items)) * unit
        return items + [items[-1]] * (n - len(items))

    def generators(self, pics: Sequence[Picture]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(seed_for(p.key, self.seed)) for p in pics]

    def batch_tensor(self, pics: Sequence[Picture]) -> torch.Tensor:
        return torch.stack([p.tensor(self.resolution, self.device) for p in pics])

    # ---------------------------------------------------------------- store keys (the only recipe)
    def prompt_id(self, prompt: Prompt | None, category: str | None = None, *, fingerprint: str | None = None) -> str:
        """The name of a prompt's output in store keys: its content (``prompt_fingerprint``,
        passed in when the caller has it: hashing a prompt's tensors is not free), and what of
        the category its output depends on (``Prompt.store_tag``), when it may depend on one."""
        tag = prompt.store_tag(category) if prompt is not None and prompt.uses_category and category is not None else "-"
        dino_call = self.fixed_call("dino") if dino_part(prompt) else None
        return f"{fingerprint or prompt_fingerprint(prompt)}:{tag}" + (f":dino-call-{dino_call}" if dino_call else "")

    def feature_key(self, pic: Picture, prompt_id: str) -> str:
        """The store key of ``pic``'s map under a pair-independent prompt named ``prompt_id``."""
        vae_call = self.fixed_call("posterior")
        return settings_key(pic.key, {"featurizer": self.featurizer.settings(), "prompt": prompt_id, "seed": self.seed,
                                      **({"vae_call": vae_call} if vae_call else {})})

    def pair_keys(self, src: Picture, trg: Picture, prompt_id: str) -> tuple[str, str]:
        """The store keys of a pair's two maps under a per-pair prompt (each depends on both pictures)."""
        pid = f"{prompt_id}:pair:{src.key}:{trg.key}"
        return self.feature_key(src, f"{pid}:src"), self.feature_key(trg, f"{pid}:trg")

    def map_keys(self, prompt: Prompt | None, prompt_id: str, a: Picture, b: Picture | None = None) -> list[str]:
        """Store keys of the maps ``pair_maps(prompt, a, b, prompt_id=...)`` returns (of ``a`` alone without ``b``)."""
        if per_pair(prompt) and b is not None:
            return list(self.pair_keys(a, b, prompt_id))
        return [self.feature_key(p, prompt_id) for p in ([a, b] if b is not None else [a])]

    def stored_map(self, pic: Picture, prompt_id: str) -> torch.Tensor | None:
        return self._stored(self.feature_key(pic, prompt_id))

    def _stored(self, key: str) -> torch.Tensor | None:
        hit = self.store.get("features", key, self.device, made_by=self.made_by("features"))
        return None if hit is None else hit["features"]

    def has_stored(self, kind: str, key: str) -> bool:
        """Whether the store holds ``kind`` entry ``key`` made by this batcher's weights."""
        return self.store.contains(kind, key, made_by=self.made_by(kind))

    def made_by(self, kind: str) -> dict[str, str]:
        """What made the store's ``kind`` entries (``features``, ``posterior``, ``dino``) beyond
        their keys: ``{"weights": ...}``, what tells the weights of the model that makes them
        from others under the same name (``registry.weights_identity``; a fusion: both parts),
        so that entries on disk made with weights since written over are not handed back;
        empty where nothing tells it. Store keys stay as they were: entries an earlier
        release wrote name no weights and are found as before."""
        if kind not in self._made_by:
            model = {"features": lambda: self.featurizer.model_id, "posterior": lambda: self.featurizer.posterior_settings()["model"],
                     "dino": lambda: self.dino.model_id}[kind]()
            ident = weights_identity(model)
            self._made_by[kind] = {"weights": ident} if ident else {}
        return self._made_by[kind]

    # ---------------------------------------------------------------- work done once per picture
    def call_size(self, kind: str) -> int:
        """Pictures per VAE (``posterior``) or DINOv2 (``dino``) call."""
        return self.featurizer.config.vae_batch if kind == "posterior" else self.dino_batch

    def fixed_call(self, kind: str) -> int | None:
        """The fixed call size that shapes the bits of a ``kind`` result (kernels depend on a
        call's shape: a VAE posterior made 8 a call differs from one made alone at float
        noise, 1e-6), named in store keys; None where it is not fixed or is 1 (the keys of
        one picture a call, as stored before the VAE and DINOv2 were batched)."""
        if not self.fixed_batches or (kind == "posterior" and not self.featurizer.has_posterior):
            return None
        n = self.call_size(kind)
        return n if n != 1 else None

    def call_settings(self, prompt: Prompt | None) -> dict[str, int]:
        """The fixed call sizes that shape the bits of maps under ``prompt`` (``fixed_call``),
        for a run's recorded settings: ``vae_call``, ``dino_call``; empty for one picture a call."""
        calls = {"vae_call": self.fixed_call("posterior"), "dino_call": self.fixed_call("dino") if dino_part(prompt) else None}
        return {k: v for k, v in calls.items() if v}

    def _work_settings(self, kind: str, part: str = "patches") -> dict:
        call = self.fixed_call(kind)
        tag = {"call": call} if call else {}
        if kind == "posterior":
            return {**self.featurizer.posterior_settings(), **tag}
        if self.dino is None:
            raise ValueError("no DINOv2 model was given")
        return {**self.dino.settings(), **({} if part == "patches" else {"part": part}), **tag}

    def work_for(self, prompt: Prompt | None) -> list[tuple[str, str]]:
        """The once-per-picture work that maps under ``prompt`` read: (kind, part) for the VAE
        posterior (featurizers with one) and DINOv2 tokens (prompts that need them)."""
        work = [("posterior", "")] if self.featurizer.has_posterior else []
        part = dino_part(prompt)
        if part is not None:
            work.append(("dino", part))
        return work

    def has_work(self, pic: Picture, work: Sequence[tuple[str, str]]) -> bool:
        """Whether the store holds all of ``work`` (``work_for``) for ``pic``."""
        return all(self.has_stored(kind, settings_key(pic.key, self._work_settings(kind, part))) for kind, part in work)

    def prepare(self, pics: Sequence[Picture], work: Sequence[tuple[str, str]]) -> None:
        """Compute and store ``work`` (``work_for``) of the pictures that lack it, in calls of
        ``call_size`` pictures (the last padded with ``fixed_batches``)."""
        for kind, part in work if pics else ():
            if kind == "posterior":
                self.posteriors(pics)
            else:
                self.tokens(pics, part)

    def _once(self, kind: str, pics: Sequence[Picture], settings: dict, compute) -> dict[str, torch.Tensor]:
        """Each picture's ``kind`` entry from the store, the missing ones computed by
        ``compute(pictures) -> {name: (B, ...)}`` in calls of ``call_size(kind)`` pictures
        (with ``fixed_batches``, a call with fewer padded to it); returns
        ``{name: (len(pics), ...)}`` in the order of ``pics``."""
        keys = [settings_key(p.key, settings) for p in pics]
        got = {k: self.store.get(kind, k, self.device, made_by=self.made_by(kind)) for k in dict.fromkeys(keys)}
        todo = [(k, p) for k, p in dict(zip(keys, pics)).items() if got[k] is None]
        step = self.call_size(kind)
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            batch = self.pad([p for _, p in chunk], step, kind)
            out = compute(batch)
            self.calls[kind].append(len(batch))
            for j, (k, _) in enumerate(chunk):
                got[k] = {name: t[j : j + 1] for name, t in out.items()}
                self.store.put(kind, k, got[k], meta=self.made_by(kind))
        return {name: torch.cat([got[k][name] for k in keys]) for name in got[keys[0]]}

    def posteriors(self, pics: Sequence[Picture]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each picture's VAE posterior, (B, 4, h, w) fp32; each computed once."""

        def vae(batch):
            mean, std = self.featurizer.posterior(self.batch_tensor(batch))
            return {"mean": mean, "std": std}

        got = self._once("posterior", pics, self._work_settings("posterior"), vae)
        return got["mean"], got["std"]

    def tokens(self, pics: Sequence[Picture], part: str = "patches") -> torch.Tensor:
        """DINOv2 patch tokens (B, P, C) fp32, or with ``part="cls"`` the CLS token (B, 1, C);
        each picture's computed once."""

        def dino(batch):
            out = {"tokens": self.dino.tokens_of_pixels(torch.stack([self.dino_input(p) for p in batch]), part).to(self.device)}
            for p in batch:  # the tokens are stored: their input is not needed again
                p.inputs.pop(self._dino_name, None)
            return out

        return self._once("dino", pics, self._work_settings("dino", part), dino)["tokens"]

    def dino_input(self, pic: Picture) -> torch.Tensor:
        """``pic`` as DINOv2 takes it (``DinoFeaturizer.pixels``), made once."""
        return pic.input_for(self._dino_name, self.dino.pixels)

    # ---------------------------------------------------------------- prompts
    def prompt_batch(self, prompt: Prompt, src: Sequence[Picture], trg: Sequence[Picture], categories: Sequence[str] | None = None) -> dict[str, Any]:
        """The batch ``prompt`` reads for these pairs: their categories (when given) and, for a
        prompt that ``needs_dino``, the DINOv2 tokens of both pictures."""
        batch: dict[str, Any] = {"categories": list(categories)} if categories is not None else {}
        if prompt.needs_dino:  # both sides' missing tokens in the same calls
            both = self.tokens([*src, *trg], prompt.dino_part)
            batch["dino_src"], batch["dino_trg"] = both[: len(src)], both[len(src) :]
        return batch

    def embeds(self, prompt: Prompt | None, category: str | None = None) -> torch.Tensor | None:
        """(1, 77, D) embeddings of a pair-independent prompt for ``category`` (None without a prompt)."""
        if prompt is None:
            return None
        with torch.no_grad():
            return prompt({"categories": [category]} if category is not None else {})

    def picture_embeds(self, prompt: Prompt | None, pic: Picture, category: str | None = None) -> torch.Tensor | None:
        """(1, 77, D) embeddings of a pair-independent prompt for one picture: its own when the
        prompt is conditioned on each picture's DINOv2 tokens, else the category's (``embeds``)."""
        if prompt is None or not prompt.per_picture_condition:
            return self.embeds(prompt, category)
        batch: dict[str, Any] = {"dino": self.tokens([pic], prompt.dino_part)}
        if category is not None:
            batch["categories"] = [category]
        with torch.no_grad():
            return prompt(batch)

    # ---------------------------------------------------------------- feature maps
    def _run(self, pics: Sequence[Picture], embeds: torch.Tensor | None, *, grad: bool = False, generator=None) -> torch.Tensor:
        """Feature maps of ``pics`` in one featurizer call (``embeds``: (1 or B, 77, D))."""
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            if not self.featurizer.has_posterior:
                return self.featurizer([p.image for p in pics])
            post = self.posteriors(pics)
            gens = generator if generator is not None else self.generators(pics)
            self.calls["unet"].append(len(pics) * self.featurizer.samples_per_picture)
            extra = {"pixels": self.batch_tensor(pics)} if self.featurizer.needs_pixels else {}
            return self.featurizer(None, posteriors=post, prompt_embeds=embeds, generator=gens, **extra)

    def pictures_per_call(self) -> int:
        """Pictures per model call: ``max_batch // samples_per_picture`` (at least 1)."""
        return max(1, self.featurizer.max_batch // self.featurizer.samples_per_picture)

    def pairs_per_call(self) -> int:
        """Pairs per model call under a per-pair prompt: ``max_batch // (2 x samples_per_picture)``."""
        return max(1, self.featurizer.max_batch // (2 * self.featurizer.samples_per_picture))

    def compute_maps(self, pics: Sequence[Picture], embeds: Sequence[torch.Tensor | None], prompt_ids: Sequence[str]) -> list[torch.Tensor]:
        """Maps of up to ``pictures_per_call`` pictures in one UNet call (padded to it with
        ``fixed_batches``), each under its own (1, 77, D) prompt; stored under their keys."""
        n = self.pictures_per_call()
        if len(pics) > n:
            raise ValueError(f"{len(pics)} pictures for one call of {n}")
        idx = self.pad(range(len(pics)), n, "unet", self.featurizer.samples_per_picture)
        emb = None if embeds[0] is None else torch.cat([embeds[i] for i in idx])
        maps = self._run([pics[i] for i in idx], emb)
        out = []
        for j, (p, pid) in enumerate(zip(pics, prompt_ids)):
            out.append(owned(maps[j : j + 1]))  # the tensor the store keeps, not a view holding the whole call's output
            self.store.put("features", self.feature_key(p, pid), {"features": out[-1]}, meta=self.made_by("features"))
        return out

    def features(self, pics: Sequence[Picture], embeds: torch.Tensor | None, prompt_id: str) -> list[torch.Tensor]:
        """(1, C, h, w) maps of ``pics`` under one pair-independent prompt, each computed once
        (``prompt_id`` names the prompt in the store key; ``embeds`` is (1, 77, D))."""
        got = {p.key: self.stored_map(p, prompt_id) for p in pics}
        todo = list({p.key: p for p in pics if got[p.key] is None}.values())
        self.prepare(todo, self.work_for(None))  # their posteriors in whole VAE calls, before the UNet's chunks
        n = self.pictures_per_call()
        for i in range(0, len(todo), n):
            chunk = todo[i : i + n]
            for p, m in zip(chunk, self.compute_maps(chunk, [embeds] * len(chunk), [prompt_id] * len(chunk))):
                got[p.key] = m
        return [got[p.key] for p in pics]

    def pair_features(self, src: Sequence[Picture], trg: Sequence[Picture], embeds: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of P pairs under per-pair prompts (``embeds``: (P, 77, D)) in one call: (P, C, h, w) x 2.
        (The caller pads the pairs, so that the prompt's own batch is fixed too.)"""
        p = len(src)
        # one prompt for all (1), one a pair for both pictures (P), or one a picture (2P: the sources', then the targets')
        emb2 = embeds if embeds.shape[0] in (1, 2 * p) else torch.cat([embeds, embeds])
        maps = self._run([*src, *trg], emb2, **kw)
        return maps[:p], maps[p:]

    def pair_maps(self, prompt: Prompt | None, a: Picture, b: Picture, *, prompt_id: str, embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, h, w) maps of ``a`` and ``b`` for matching one to the other, kept in the store.

        A pair-independent prompt gives each picture's map once (``embeds``: its (1, 77, D)
        embeddings); a per-pair prompt (CPM) is built from both pictures, and their maps are
        kept under the pair's keys. ``prompt_id`` is ``prompt_id(prompt, category)``.
        """
        if prompt is not None and prompt.per_picture_condition:  # each picture under its own prompt
            return self.features([a], self.picture_embeds(prompt, a), prompt_id)[0], self.features([b], self.picture_embeds(prompt, b), prompt_id)[0]
        if not per_pair(prompt):
            fa, fb = self.features([a, b], embeds, prompt_id)
            return fa, fb
        ka, kb = self.pair_keys(a, b, prompt_id)
        fa, fb = self._stored(ka), self._stored(kb)
        if fa is not None and fb is not None:
            return fa, fb
        with torch.no_grad():
            emb = prompt(self.prompt_batch(prompt, [a], [b]))
        fa, fb = self.pair_features([a], [b], emb)
        self.store.put("features", ka, {"features": fa}, meta=self.made_by("features"))
        self.store.put("features", kb, {"features": fb}, meta=self.made_by("features"))
        return fa, fb

    def stream(self, prompt: Prompt | None, records: Iterable[PairRecord], root: str | Path, consume: Callable[[Any, torch.Tensor, torch.Tensor], R],
               *, workers: int = 4, ahead: int = 64, max_pictures: int = 64, max_pairs: int = 1024) -> Iterator["PendingPair[R]"]:
        """Pairs through the models as a stream: loader threads read up to ``ahead`` pairs in
        advance (``load_pair``: a picture whose map is stored is not decoded);
        ``consume(record, src map, trg map)`` runs as soon as a pair's maps exist, in any
        order (so maps need not wait in memory); the pairs come back in record order as
        ``PendingPair``s holding what ``consume`` returned, or the error that kept their
        pictures from loading.

        A model call runs as soon as ``pictures_per_call`` new pictures (pair-independent
        prompts) or ``pairs_per_call`` pairs (per-pair prompts) are waiting, so every call
        but the last is full; and also when the pairs waiting would hold more than
        ``max_pictures`` decoded pictures or ``max_pairs`` pairs wait to be returned in
        order (a padded call: the results are the same bit for bit). Memory is so bounded by
        these settings, not by the number of pairs; ``stream_peak`` reports the largest
        numbers seen.
        """
        pairs = PairStream(self, prompt, consume, max_pictures=max_pictures, max_pairs=max_pairs)
        part = dino_part(prompt)
        loaded = prefetch(records, lambda r: self.load_pair(root, r, need=pairs.needed, dino_part=part), workers=workers, ahead=ahead)
        try:
            yield from pairs.run(loaded)
        finally:
            loaded.close()  # stop the loader threads, also when the consumer stopped early


@dataclass(eq=False)
class PendingPair(Generic[R]):
    """A pair in ``Batcher.stream``: its record, its pictures or why they did not load, and
    ``result`` once its maps were consumed."""

    record: Any
    pictures: tuple[Picture, Picture] | None
    error: BaseException | None = None
    result: R | None = None
    done: bool = False

    @property
    def ready(self) -> bool:
        return self.error is not None or self.done


class PairStream:
    """The scheduler behind ``Batcher.stream``: a queue of pairs in record order, and the
    pictures (pair-independent prompts) or pairs (per-pair prompts) waiting for a model call.

    A picture entering without its once-per-picture work stored (VAE posterior, DINOv2
    tokens: ``Batcher.work_for``) is ``fresh``; fresh pictures are prepared in whole VAE and
    DINOv2 calls (``prepare_size`` of them at once), and a picture or pair goes to the UNet
    once its pictures are prepared. A pair's pictures are let go as soon as its maps were
    consumed; ``held`` counts, per picture, the waiting pairs that hold it. The maps computed
    here are kept (``maps``) while a waiting pair holds their picture: the store is a cache,
    and one too small to keep them (``--store-gb``) costs recomputation, never progress."""

    def __init__(self, batcher: Batcher, prompt: Prompt | None, consume: Callable, *, max_pictures: int = 64, max_pairs: int = 1024):
        if max_pictures < 2 or max_pairs < 1:
            raise ValueError(f"max_pictures must be at least 2 (one pair) and max_pairs at least 1, not {max_pictures} and {max_pairs}")
        self.b, self.prompt, self.consume = batcher, prompt, consume
        self.max_pictures, self.max_pairs = max_pictures, max_pairs
        self.per_pair = per_pair(prompt)
        self.conditioned = prompt is not None and prompt.per_picture_condition  # each picture under its own prompt
        self.queue: deque[PendingPair] = deque()
        self.todo: dict[tuple[str, str], tuple[Picture, torch.Tensor | None]] = {}  # (picture key, prompt id) -> (picture, category embeddings)
        self.held: Counter[str] = Counter()  # picture key -> waiting pairs holding it
        self.work = batcher.work_for(prompt)
        self.prepare_size = max((batcher.call_size(kind) for kind, _ in self.work), default=0)
        self.fresh: dict[str, Picture] = {}  # pictures waiting for their once-per-picture work, in arrival order
        self.prepared: set[str] = set()  # pictures whose work is done (or was stored)
        self.maps: dict[tuple[str, str], torch.Tensor] = {}  # (picture key, prompt id) -> map computed here, while a waiting pair holds the picture
        self.fingerprint = prompt_fingerprint(prompt)  # once: the prompt does not change during a stream
        self.ids: dict[str, str] = {}  # category -> prompt id
        self.embs: dict[str, torch.Tensor | None] = {}  # prompt id -> embeddings
        batcher.stream_peak = {"pictures": 0, "pairs": 0, "flushes": 0}
        self.peak = batcher.stream_peak

    def run(self, loaded) -> Iterator[PendingPair]:
        for record, pics in loaded:
            failed = isinstance(pics, BaseException)
            keys = set() if failed else {p.key for p in pics}
            new = sum(k not in self.held for k in keys)
            if self.held and self.over(new):
                self.flush(new)
                yield from self.finished()
            entry = PendingPair(record, None if failed else pics, pics if failed else None)
            self.queue.append(entry)
            if not failed:
                self.held.update(keys)
                self.peak["pictures"] = max(self.peak["pictures"], len(self.held))
            self.peak["pairs"] = max(self.peak["pairs"], len(self.queue))
            if not failed:
                self.arrive(entry)
            self.compute(final=False)
            yield from self.finished()
        self.compute(final=True)
        yield from self.finished(all_=True)

    def finished(self, all_: bool = False) -> Iterator[PendingPair]:
        while self.queue and (all_ or self.queue[0].ready):
            yield self.queue.popleft()

    def over(self, new: int) -> bool:
        """Whether a pair bringing ``new`` pictures would pass a bound on what waits."""
        return len(self.held) + new > self.max_pictures or len(self.queue) >= self.max_pairs

    def flush(self, new: int) -> None:
        """The bound on held pictures or waiting pairs was reached: the fresh pictures are
        prepared now (a padded VAE / DINOv2 call), full UNet calls run, and if what still
        waits is over the bound, a padded UNet call too."""
        self.peak["flushes"] += 1
        self.prepare_fresh(final=True)
        self.compute(final=False)
        if self.held and self.over(new):
            self.compute(final=True)

    def needed(self, record, src: Picture, trg: Picture) -> tuple[bool, bool]:
        """Which of a pair's pictures have no stored map (asked by loader threads, so that only
        those are decoded ahead)."""
        keys = self.b.map_keys(self.prompt, self.prompt_id(record), src, trg)
        missing = tuple(not self.b.has_stored("features", k) for k in keys)
        return (any(missing),) * 2 if self.per_pair else missing

    def done(self, entry: PendingPair, result) -> None:
        """``entry`` consumed: its result kept, its pictures let go."""
        entry.result, entry.done = result, True
        for key in {p.key for p in entry.pictures}:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
                for k in [k for k in self.maps if k[0] == key]:
                    del self.maps[k]
        entry.pictures = None

    def arrive(self, entry: PendingPair) -> None:
        """A pair entered the queue: it (per-pair prompts) or its pictures whose maps are not
        stored (pair-independent) wait for a model call, once their pictures are prepared."""
        if self.per_pair:
            self.need_work(entry.pictures)
            return
        self.want(entry)
        self.match_ready()

    def need_work(self, pics: Sequence[Picture]) -> None:
        """Note which of ``pics`` lack their once-per-picture work."""
        for p in pics:
            if p.key not in self.prepared and p.key not in self.fresh:
                if self.b.has_work(p, self.work):
                    self.prepared.add(p.key)
                else:
                    self.fresh[p.key] = p

    def prepare_fresh(self, final: bool) -> None:
        """The fresh pictures' work in whole calls of ``prepare_size`` (all of it when ``final``)."""
        n = len(self.fresh) if final else len(self.fresh) - len(self.fresh) % max(1, self.prepare_size)
        if n <= 0:
            return
        pics = [self.fresh.pop(k) for k in list(self.fresh)[:n]]
        self.b.prepare(pics, self.work)
        self.prepared.update(p.key for p in pics)

    # .................................................................. pair-independent prompts
    def prompt_id(self, record) -> str:
        """The prompt id of a record's category, each computed once (also from loader threads)."""
        cat = record.category
        if cat not in self.ids:
            self.ids[cat] = self.b.prompt_id(self.prompt, cat, fingerprint=self.fingerprint)
        return self.ids[cat]

    def embedded(self, record) -> tuple[str, torch.Tensor | None]:
        """(prompt id, embeddings) of a record's category, each computed once."""
        pid = self.prompt_id(record)
        if pid not in self.embs:  # once per prompt id: categories a prompt does not tell apart share it
            self.embs[pid] = None if self.conditioned else self.b.embeds(self.prompt, record.category)  # conditioned: picture_emb
        return pid, self.embs[pid]

    def picture_emb(self, p: Picture, emb: torch.Tensor | None) -> torch.Tensor | None:
        """The embeddings ``p``'s map is made under: the category's, or its own (a prompt
        conditioned on each picture: made from its tokens, once they are prepared)."""
        return self.b.picture_embeds(self.prompt, p) if self.conditioned else emb

    def want(self, entry: PendingPair) -> None:
        """Queue the entry's pictures that are neither stored nor queued yet."""
        pid, emb = self.embedded(entry.record)
        for p in entry.pictures:
            if (p.key, pid) not in self.todo and (p.key, pid) not in self.maps and not self.b.has_stored("features", self.b.feature_key(p, pid)):
                self.todo[(p.key, pid)] = (p, emb)
                self.need_work([p])

    def match_ready(self) -> None:
        """Consume every waiting pair whose two maps are stored."""
        for entry in self.queue:
            if entry.ready:
                continue
            pid, emb = self.embedded(entry.record)
            src, trg = entry.pictures
            if (src.key, pid) in self.todo or (trg.key, pid) in self.todo:
                continue
            fs, ft = self.map_of(src, pid), self.map_of(trg, pid)
            if fs is None or ft is None:  # stored when the pair came, evicted from the store since: computed again (same bits)
                for p, got in ((src, fs), (trg, ft)):
                    if got is None and (p.key, pid) not in self.todo:
                        self.todo[(p.key, pid)] = (p, emb)
                        self.need_work([p])
                continue
            self.done(entry, self.consume(entry.record, fs, ft))

    def map_of(self, p: Picture, pid: str) -> torch.Tensor | None:
        """``p``'s map under ``pid``: computed here, else from the store (None: neither)."""
        got = self.maps.get((p.key, pid))
        return got if got is not None else self.b.stored_map(p, pid)

    def compute(self, final: bool) -> None:
        self.prepare_fresh(final)
        (self.compute_pairs if self.per_pair else self.compute_pictures)(final)

    def compute_pictures(self, final: bool) -> None:
        n = self.b.pictures_per_call()
        while True:
            ready = [k for k, (p, _) in self.todo.items() if p.key not in self.fresh]
            if not (len(ready) >= n or (final and ready)):
                return
            items = [(k, self.todo.pop(k)) for k in ready[:n]]
            maps = self.b.compute_maps([p for _, (p, _) in items], [self.picture_emb(p, e) for _, (p, e) in items], [pid for (_, pid), _ in items])
            self.maps.update(zip([k for k, _ in items], maps))
            self.match_ready()

    # .................................................................. per-pair prompts
    def compute_pairs(self, final: bool) -> None:
        n = self.b.pairs_per_call()
        waiting = [e for e in self.queue if not e.ready and not any(p.key in self.fresh for p in e.pictures)]
        while len(waiting) >= n or (final and waiting):
            group, waiting = waiting[:n], waiting[n:]
            full = self.b.pad(group, n, "unet", 2 * self.b.featurizer.samples_per_picture)
            src, trg = [e.pictures[0] for e in full], [e.pictures[1] for e in full]
            with torch.no_grad():
                emb = self.prompt(self.b.prompt_batch(self.prompt, src, trg))
            fs, ft = self.b.pair_features(src, trg, emb)
            for i, e in enumerate(group):  # per-pair maps are not stored: one a pair would fill any store
                self.done(e, self.consume(e.record, fs[i : i + 1], ft[i : i + 1]))
