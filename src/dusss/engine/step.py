"""Pieces of one training micro-step shared by the pre-training and segmentation loops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dusss import distributed as dist
from dusss.engine.precision import channels_last_input
from dusss.engine.state import check_finite


def to_device(batch: dict[str, Any], device: torch.device, channels_last_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Move the tensors of `batch` to `device`; the images named in `channels_last_keys` go channels_last."""
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for key in channels_last_keys:
        if torch.is_tensor(out.get(key)):
            out[key] = channels_last_input(out[key], True)
    return out


def backward_micro_step(loss: torch.Tensor, logs: dict[str, float], scaler: Any, accum: int, step: int,
                        last_good: Path, device: torch.device, sums: dict[str, float],
                        counts: dict[str, int]) -> None:
    """Stop every rank together on a non-finite loss (naming `step` and `last_good` if it exists), backpropagate
    `loss / accum` through `scaler`, and add the loss and `logs` to the epoch's running sums."""
    finite = bool(torch.isfinite(loss.detach()).all())
    if dist.any_across_ranks(not finite, device):
        check_finite(loss if not finite else loss.detach() * float("nan"), step,
                     last_good if last_good.exists() else None)
    scaler.scale(loss / accum).backward()
    for k, v in {"loss": float(loss.detach()), **logs}.items():
        sums[k] = sums.get(k, 0.0) + float(v)
        counts[k] = counts.get(k, 0) + 1
