"""What every dataset reader provides."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from sd4match.data.images import image_size
from sd4match.data.records import BaseRule, PairRecord
from sd4match.errors import DataError


class PairDataset(abc.ABC):
    """A benchmark in its official layout under ``root``.

    Subclasses set ``name``, ``splits`` and ``base_rule`` and implement ``layout_problem``,
    ``split_file`` and ``_read_split``.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    base_rule: ClassVar[BaseRule]
    #: top-level entries the official layout has (for ``datasets check`` and ``download``).
    required: ClassVar[tuple[str, ...]] = ()
    #: whether the layout has a pair list for every split (``datasets check`` names a missing one);
    #: a custom root holds the splits its owner wrote
    every_split: ClassVar[bool] = True
    #: whether a split's pairs are made from what the root holds (your own pictures or lists):
    #: the same dataset and split name may then be other pairs under another root
    pairs_from_root: ClassVar[bool] = False
    #: the reader's own options (``open_dataset(name, root, **options)``; the CLI's ``--images``, ``--all-pairs``)
    options: ClassVar[tuple[str, ...]] = ()
    #: groupings of the pairs besides their category (``meta["groups"]``), reported by ``score``
    groups: ClassVar[tuple[str, ...]] = ()
    #: where the geometry-aware points of a pair come from (``meta["geo_aware"]``), for
    #: ``datasets check``; empty where the dataset has no groups of mirrored keypoints
    geo_source: ClassVar[str] = ""
    #: how the papers that report on this dataset aggregate and threshold (README's dataset table)
    convention: ClassVar[str] = ""
    #: keypoint id (``records.keypoint_ids``) -> its name, where the dataset names its keypoints
    keypoint_names: ClassVar[dict[str, str]] = {}

    def __init__(self, root: str | Path):
        self.root = Path(root)
        problem = self.layout_problem()
        if problem:
            raise DataError(self.root, problem)
        self._sizes: dict[str, tuple[int, int]] = {}

    @abc.abstractmethod
    def layout_problem(self) -> str | None:
        """A sentence saying why ``root`` is not this dataset's root, or None."""

    @abc.abstractmethod
    def split_file(self, split: str) -> Path | None:
        """The file that lists the pairs of ``split``, or None when it is absent."""

    @abc.abstractmethod
    def _read_split(self, split: str, path: Path) -> list[PairRecord]:
        ...

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise DataError(self.root, f"{self.name} has no split {split!r}; its splits are {', '.join(self.splits)}")
        return split

    def available_splits(self) -> list[str]:
        return [s for s in self.splits if self.split_file(s) is not None]

    def pairs(self, split: str, *, apply_flip: bool = False) -> list[PairRecord]:
        """All pair records of ``split``, in the official list order.

        With ``apply_flip``, pairs whose ``meta["flip"]`` is set come back mirrored (points,
        boxes, and pixels when loaded), as the field's training code uses them; only
        PF-Pascal's trn list sets it.
        """
        self.check_split(split)
        path = self.split_file(split)
        if path is None:
            raise DataError(self.root, f"no pair list for split {split!r} of {self.name} ({self.expected_split_file(split)} is missing)")
        recs = self._read_split(split, path)
        if apply_flip:
            recs = [r.mirrored() if r.meta.get("flip") else r for r in recs]
        return recs

    def expected_split_file(self, split: str) -> str:
        return f"the {split} pair list"

    def image_size(self, rel: str) -> tuple[int, int]:
        """(W, H) of an image given relative to root, from its header (cached)."""
        if rel not in self._sizes:
            self._sizes[rel] = image_size(self.root / rel)
        return self._sizes[rel]

    def image_path(self, rel: str) -> Path:
        return self.root / rel
