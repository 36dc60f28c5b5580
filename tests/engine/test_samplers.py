"""Rank-aware epoch samplers for the labeled and unlabeled streams."""

from __future__ import annotations

import pytest
import torch

from dusss.engine.samplers import EpochSampler, cycle_to_length
from dusss.errors import TrainingError


def _shares(n: int, world: int, epoch: int, **kw: object) -> list[list[int]]:
    out = []
    for r in range(world):
        s = EpochSampler(n, seed=3, rank=r, world_size=world, **kw)  # type: ignore[arg-type]
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_rank_shares_are_disjoint_and_cover_the_permutation() -> None:
    shares = _shares(12, 3, epoch=0)
    assert [len(s) for s in shares] == [4, 4, 4]
    flat = [i for s in shares for i in s]
    assert sorted(flat) == list(range(12))  # disjoint + covering
    assert flat != list(range(12))  # shuffled
    # uneven n: padded so every rank gets the same count, still covering everything
    shares = _shares(10, 3, epoch=0)
    assert [len(s) for s in shares] == [4, 4, 4]
    assert set().union(*map(set, shares)) == set(range(10))
    # drop_last: disjoint, equal, tail dropped
    shares = _shares(10, 3, epoch=0, drop_last=True)
    flat = [i for s in shares for i in s]
    assert [len(s) for s in shares] == [3, 3, 3] and len(set(flat)) == 9


def test_deterministic_per_epoch_and_different_across_epochs() -> None:
    assert _shares(50, 2, epoch=4) == _shares(50, 2, epoch=4)
    assert _shares(50, 2, epoch=4) != _shares(50, 2, epoch=5)
    a = EpochSampler(50, seed=1, rank=0, world_size=1)
    b = EpochSampler(50, seed=2, rank=0, world_size=1)
    assert list(a) != list(b)  # independent streams via different seeds
    assert list(EpochSampler(5, shuffle=False, rank=0, world_size=1)) == [0, 1, 2, 3, 4]


def test_defaults_come_from_the_process_group() -> None:
    s = EpochSampler(7, seed=0)
    assert (s.rank, s.world_size, len(s)) == (0, 1, 7)
    with pytest.raises(ValueError):
        EpochSampler(7, rank=2, world_size=2)


def test_length_reshuffles_each_pass() -> None:
    s = EpochSampler(4, seed=0, rank=0, world_size=1, length=10)
    idx = list(s)
    assert len(s) == len(idx) == 10
    assert sorted(idx[:4]) == sorted(idx[4:8]) == [0, 1, 2, 3]
    s2 = EpochSampler(4, seed=0, rank=1, world_size=2, length=5)
    assert len(list(s2)) == 5


def test_cycle_to_length() -> None:
    assert cycle_to_length([3, 1, 2], 7) == [3, 1, 2, 3, 1, 2, 3]
    assert cycle_to_length([3, 1, 2], 2) == [3, 1]
    assert cycle_to_length([], 0) == []
    with pytest.raises(TrainingError, match="empty"):
        cycle_to_length([], 3)
    # zip the short labeled stream with the long unlabeled one
    unl = list(EpochSampler(9, seed=1, rank=0, world_size=1))
    lab = cycle_to_length(list(EpochSampler(2, seed=0, rank=0, world_size=1)), len(unl))
    assert len(list(zip(lab, unl))) == 9


def test_epoch_batches_walks_each_epochs_permutation_and_sets_the_dataset_epoch() -> None:
    from dusss.engine.samplers import EpochSampler, epoch_batches, epoch_permutation

    class Seen(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> int:
            return i

    ds = Seen()
    batches = list(epoch_batches(ds, EpochSampler(6, seed=3), 4, [7, 9]))
    assert ds.epochs == [7, 9]
    order = torch.cat(batches).tolist()
    expected = [*epoch_permutation(6, 3, 7).tolist(), *epoch_permutation(6, 3, 9).tolist()]
    assert order == expected and [len(b) for b in batches] == [4, 2, 4, 2]
