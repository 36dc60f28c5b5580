"""Rank-aware, seeded samplers for the labeled and unlabeled streams (two independent samplers).

Every epoch all ranks draw the same permutation of `range(n)` from (seed, epoch) and each takes an
interleaved share `perm[rank::world_size]`, so shares are disjoint and together cover the permutation.
Without `drop_last` the permutation is padded (repeating its start) to a multiple of world_size so that
all ranks get the same number of indices (needed for collective ops); with it the tail is dropped.

The two streams use two samplers with different seeds (e.g. seed and seed + 1); the shorter one is
stretched to the longer one's length with `cycle_to_length` (or `EpochSampler(length=...)`, which
reshuffles at every pass instead of repeating the same order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from dusss import distributed
from dusss.errors import TrainingError


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True, pass_index: int = 0) -> np.ndarray:
    """The permutation of range(n) for (seed, epoch, pass) — identical on every rank and platform."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(pass_index)]))
    return rng.permutation(n).astype(np.int64)


def rank_share(perm: np.ndarray, rank: int, world_size: int, drop_last: bool = False) -> np.ndarray:
    """Rank `rank`'s interleaved share of `perm` (padded or truncated to a multiple of world_size)."""
    n = len(perm)
    if drop_last:
        total = (n // world_size) * world_size
        perm = perm[:total]
    elif n % world_size and n > 0:
        total = -(-n // world_size) * world_size
        reps = -(-total // n)
        perm = np.concatenate([perm] * reps)[:total]
    return perm[rank::world_size]


def cycle_to_length(indices: Sequence[int], length: int) -> list[int]:
    """Repeat `indices` cyclically (or cut them) to exactly `length` items."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length == 0:
        return []
    if len(indices) == 0:
        raise TrainingError(f"cannot draw {length} samples from an empty stream (is the split empty?)")
    reps = -(-length // len(indices))
    return [int(i) for i in list(indices) * reps][:length]


class EpochSampler(Sampler[int]):
    """Seeded, rank-aware sampler over `range(n)`; call `set_epoch(e)` before each epoch.

    Yields this rank's share of the (seed, epoch) permutation. With `length`, the share is stretched or cut
    to `length` indices per epoch, each further pass over the data using a fresh permutation.
    `rank`/`world_size` default to the current process group (single process: 0 / 1).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, length: int | None = None) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        self.rank = distributed.rank() if rank is None else int(rank)
        self.drop_last = drop_last
        self.length = length
        self.epoch = 0
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid rank {self.rank} for world size {self.world_size}")
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0, got {length}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        self.epoch = int(epoch)

    def share_size(self) -> int:
        """Indices per rank in one pass over the data."""
        if self.drop_last:
            return self.n // self.world_size
        return -(-self.n // self.world_size)

    def _share(self, pass_index: int) -> np.ndarray:
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle, pass_index)
        return rank_share(perm, self.rank, self.world_size, self.drop_last)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        if self.length is None:
            return self._share(0).tolist()
        out: list[int] = []
        pass_index = 0
        if self.length and self.share_size() == 0:
            raise TrainingError(f"cannot draw {self.length} samples per rank from {self.n} item(s) "
                                f"over {self.world_size} rank(s)")
        while len(out) < self.length:
            out.extend(self._share(pass_index).tolist())
            pass_index += 1
        return out[: self.length]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.share_size() if self.length is None else self.length


def epoch_batches(dataset: Dataset, sampler: EpochSampler, batch_size: int, epochs: Iterable[int],
                  num_workers: int = 0) -> Iterator[Any]:
    """Batches over successive passes: for each epoch of `epochs`, the sampler's permutation and the dataset's
    augmentation stream of that epoch (`set_epoch` on both when the dataset has it), then its batches."""
    for epoch in epochs:
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from DataLoader(dataset, batch_size=batch_size, sampler=list(sampler), num_workers=num_workers)
