"""Resumable training state without pickle: module and optimizer tensors in safetensors, the rest in JSON.

`save_train_state` writes one `kind="train_state"` checkpoint holding several state dicts under prefixes
(`model.`, `teacher.`, ...), the optimizer's per-parameter tensors, and JSON metadata (epoch, step,
early-stopping state, RNG states). Written atomically, so a kill at any moment leaves the previous state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dusss.checkpoint import load_checkpoint, prefixed, save_checkpoint, unprefixed

STATE_KIND = "train_state"


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `opt.state_dict()` into tensors (per-parameter state) and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_to_tensors`: load the state into `opt`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_train_state(
    path: str | Path,
    modules: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write modules' state dicts (under their names), the optimizer and `meta` in one atomic checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for name, sd in modules.items():
        tensors.update(prefixed(f"module.{name}", sd))
    full_meta = dict(meta)
    if optimizer is not None:
        otensors, ometa = optimizer_to_tensors(optimizer)
        tensors.update(prefixed("optimizer", otensors))
        full_meta["optimizer"] = ometa
    if extra_tensors:
        tensors.update(prefixed("extra", extra_tensors))
    full_meta["modules"] = sorted(modules)
    save_checkpoint(path, tensors, STATE_KIND, full_meta)


def load_train_state(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Return (modules' state dicts, optimizer tensors, extra tensors, meta) of a `save_train_state` file."""
    tensors, meta = load_checkpoint(path, STATE_KIND)
    modules = {name: unprefixed(f"module.{name}", tensors) for name in meta.get("modules", [])}
    return modules, unprefixed("optimizer", tensors), unprefixed("extra", tensors), meta


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_ratio: float = 0.01) -> float:
    """Linear warm-up then cosine decay to `min_ratio * base_lr`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, factor_of_base: float) -> None:
    """Scale every group's `base_lr` (stored in the group) by the schedule factor."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor_of_base


def check_finite(loss: torch.Tensor, step: int, last_good: str | Path | None) -> None:
    """Raise TrainingError naming the step and the last good checkpoint if `loss` is NaN or inf."""
    if not torch.isfinite(loss).all():
        from dusss.errors import TrainingError

        where = f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint written yet"
        raise TrainingError(f"loss became {loss.item()} at step {step}{where}")
