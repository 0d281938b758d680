"""Seeds and the order of training samples: everything random in a run derives from (seed, step, rank).

The samples of step ``t`` are global positions ``t*B .. t*B+B-1`` of a stream of seeded permutations of the dataset
(one per pass), each loaded as ``dataset[(index, seed)]`` with its own augmentation seed; the model's random numbers
(dropout, drop path) are reseeded from (seed, step, micro-batch, rank) before every forward. Nothing random depends
on history, so a resumed run equals an uninterrupted one, and the union over ranks of one step's samples is the
single-process batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


class SeedStream(IntEnum):
    """The last key of every ``derive_seed`` call: which stream of random numbers a seed belongs to, so that no two
    streams share a seed. The values are part of every run's results: changing one changes them all."""

    SAMPLE_ORDER = 1  # the permutation of the dataset for one pass: (seed, pass, SAMPLE_ORDER)
    AUGMENTATION = 2  # one sample's augmentation: (seed, global position, AUGMENTATION)
    FORWARD = 3  # dropout and drop path of one micro-batch: (seed, step, micro-batch, rank, FORWARD)


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SampleStream:
    """Global sample positions -> dataset indices: pass ``e`` over the data is a permutation seeded by (seed, e)."""

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed = num_items, seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __getitem__(self, position: int) -> tuple[int, int]:
        """(dataset index, augmentation seed) of global position ``position``."""
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, SeedStream.SAMPLE_ORDER))
            self._epoch, self._order = epoch, torch.randperm(self.num_items, generator=generator)
        return int(self._order[offset]), derive_seed(self.seed, position, SeedStream.AUGMENTATION)


class StepBatches(Sampler):
    """Micro-batches of this rank from ``start_step`` to ``max_iters``: step t, micro-batch a, rank r gets global
    positions t*B + (a*W + r)*b + [0, b) with b = B / (W*A)."""

    def __init__(self, stream: SampleStream, start_step: int, max_iters: int, batch: int, rank: int, world: int,
                 accum: int) -> None:
        self.stream, self.start, self.stop = stream, start_step, max_iters
        self.batch, self.rank, self.world, self.accum = batch, rank, world, accum
        self.micro = batch // (world * accum)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            for a in range(self.accum):
                first = step * self.batch + (a * self.world + self.rank) * self.micro
                yield [self.stream[p] for p in range(first, first + self.micro)]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the images and labels of dataset items into a batch."""
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}

