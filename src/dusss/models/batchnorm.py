"""BatchNorm helpers for teacher-student training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen_running_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, BatchNorm layers in train mode still normalise with the batch statistics but leave
    their running mean / variance (and `num_batches_tracked`) untouched, so that a pass over perturbed inputs
    (strong views, dropped features) does not move the statistics that eval mode uses. `enabled=False`: no-op."""
    if not enabled:
        yield
        return
    tracking = [m for m in module.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in tracking:
        m.track_running_stats = False  # with running buffers present, forward then uses batch stats only
    try:
        yield
    finally:
        for m in tracking:
            m.track_running_stats = True


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm layer of `module` normalises with the statistics of the batch it sees
    and leaves its running mean / variance untouched, while the rest of the network (dropout) stays in
    whatever mode it is in. The layers' previous modes are restored on exit."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.train()
    try:
        with frozen_running_stats(module):
            yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)
