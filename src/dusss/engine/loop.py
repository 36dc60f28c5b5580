"""The loop skeleton shared by Step 1 (`engine.pretrain`) and Step 2 (`engine.train`): the optimizer steps of one
epoch (accumulation, precision, the non-finite guard, gradient averaging over ranks, the learning-rate
schedule), the resume point (read and written), and the end of a run. Each stage says only which batches,
how a batch becomes a loss, what follows an optimizer step, and what to validate and save.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dusss import distributed as dist
from dusss.checkpoint import load_state_into
from dusss.engine.logging import CURVES_MIN_INTERVAL_S, MetricsLogger, plot_curves, progress
from dusss.engine.precision import autocast_context, restore_grad_scaler
from dusss.engine.seed import rng_state, set_rng_state
from dusss.engine.state import cosine_lr, load_train_state, optimizer_from_tensors, save_train_state, set_lr
from dusss.engine.step import backward_micro_step
from dusss.runfiles import RunFiles


@dataclass
class Stepper:
    """How micro-batches become optimizer steps: `accum` micro-batches per step, cosine schedule over
    `total_steps` with `warmup` steps, `precision` autocast on `device`, `scaler` for fp16.

    Gradients are averaged over ranks by DDP for `ddp_module` (its all-reduce happens in the backward of a
    step's last micro-batch; the earlier ones run under `no_sync`) and by `dist.sync_gradients` for
    `sync_params`; after each step the floating buffers of `buffers_of` (BatchNorm statistics) are copied
    from rank 0 and `after_step(step)` runs (EMA teachers, momentum encoders). `last_good` is the checkpoint
    named when a non-finite loss stops the run."""

    optimizer: torch.optim.Optimizer
    scaler: Any
    accum: int
    total_steps: int
    warmup: int
    device: torch.device
    precision: str
    last_good: Path
    sync_params: list[torch.nn.Parameter] = field(default_factory=list)
    ddp_module: torch.nn.Module | None = None
    buffers_of: torch.nn.Module | None = None
    after_step: Callable[[int], None] | None = None

    def epoch(self, micro_batches: Iterable[Any], n_micro: int, step: int,
              loss_of: Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]], desc: str,
              show: bool) -> tuple[int, dict[str, float], dict[str, int], float]:
        """Run `n_micro` micro-batches (`loss_of(micro_batch, step) -> (loss, logs)`) from global step `step`.
        Returns (the step after the last optimizer step, sums of the logged values, their counts, seconds)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        t0 = time.time()
        for i, micro in enumerate(progress(micro_batches, desc=desc, total=n_micro, enabled=show)):
            if i >= n_micro:
                break
            if i % self.accum == 0:  # first micro-batch of an optimizer step
                set_lr(self.optimizer, cosine_lr(step, self.total_steps, 1.0, self.warmup))
                self.optimizer.zero_grad(set_to_none=True)
            last_micro = i % self.accum == self.accum - 1
            with dist.no_sync_unless(self.ddp_module, last_micro):
                with autocast_context(self.device, self.precision):
                    loss, logs = loss_of(micro, step)
                backward_micro_step(loss, logs, self.scaler, self.accum, step, self.last_good, self.device, sums,
                                    counts)
            if not last_micro:
                continue
            dist.sync_gradients(self.sync_params, average=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.buffers_of is not None:
                dist.broadcast_module(self.buffers_of, buffers_only=True)  # rank 0's BatchNorm statistics
            if self.after_step is not None:
                self.after_step(step)
            step += 1
        return step, sums, counts, time.time() - t0

    def train_row(self, sums: dict[str, float], counts: dict[str, int], seconds: float,
                  images: int) -> dict[str, Any]:
        """The epoch's logged training row: means over ranks and micro-batches, time, throughput, lr."""
        row: dict[str, Any] = {f"train/{k}": v for k, v in dist.mean_over_ranks(sums, counts).items()}
        row["seconds_per_epoch"] = seconds
        row["images_per_s"] = images / max(seconds, 1e-9)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        return row


def begin_run(device: str, threads: int, seed: int, seed_per_rank: bool = False) -> torch.device:
    """A loop's first lines: join the process group (torchrun / srun), choose the device, set the CPU threads
    and seed every RNG with `seed` (`seed + rank` with `seed_per_rank`). Returns the device."""
    from dusss.engine.precision import resolve_device, set_threads
    from dusss.engine.seed import seed_everything

    dist.init_from_env(device)
    resolved = resolve_device(device)
    set_threads(threads)
    seed_everything(seed + (dist.rank() if seed_per_rank else 0))
    return resolved


def load_resume_point(state_path: Path, required: dict[str, torch.nn.Module], optional: dict[str, Any],
                      optimizer: torch.optim.Optimizer, scaler: Any) -> dict[str, Any]:
    """Restore a run from RUN/state.safetensors: each `required` module strictly (`load_state_into`: a missing
    or extra tensor is a CheckpointError naming the file), each `optional` one (anything with
    `load_state_dict`) where the state holds it, then the optimizer, the RNG streams and the grad scaler.
    Returns the saved meta (`epoch`, `step` and whatever the stage saved)."""
    saved, otensors, _, meta = load_train_state(state_path)
    for name, module in required.items():
        load_state_into(module, saved.get(name, {}), state_path)
    for name, obj in optional.items():
        if name in saved:
            obj.load_state_dict(saved[name])
    optimizer_from_tensors(optimizer, otensors, meta["optimizer"])
    set_rng_state(meta["rng"])
    restore_grad_scaler(scaler, meta)
    return meta


def save_resume_point(state_path: Path, modules: dict[str, dict[str, torch.Tensor]],
                      optimizer: torch.optim.Optimizer, scaler: Any, meta: dict[str, Any]) -> None:
    """Write RUN/state.safetensors (last in an epoch: a kill before it redoes the epoch); empty module states
    are left out; the RNG streams and the grad scaler are added to `meta`."""
    kept = {name: state for name, state in modules.items() if state}
    save_train_state(state_path, kept, optimizer, {**meta, "rng": rng_state(), "grad_scaler": scaler.state_dict()})


def open_log(run: Path, resume: bool, state_path: Path, required: dict[str, torch.nn.Module],
             optional: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: Any
             ) -> tuple[MetricsLogger | None, dict[str, Any]]:
    """The metrics log (rank 0) and the resume point: with `resume` and a saved state, restore it
    (`load_resume_point`) and drop the logged rows of epochs after it (they are redone). Returns (logger, meta),
    meta holding at least `epoch` and `step` (0 and 0 for a fresh run)."""
    logger = MetricsLogger(run, fresh=not resume) if dist.is_main() else None
    meta: dict[str, Any] = {"epoch": 0, "step": 0}
    if resume and state_path.is_file():
        meta = load_resume_point(state_path, required, optional, optimizer, scaler)
    if resume and logger:
        logger.truncate_after(int(meta["epoch"]))
    return logger, meta


def close_epoch(logger: MetricsLogger | None, files: RunFiles, step: int, epoch: int, row: dict[str, Any],
                curves_every: int, modules: Callable[[], dict[str, dict[str, torch.Tensor]]],
                optimizer: torch.optim.Optimizer, scaler: Any, meta: dict[str, Any]) -> None:
    """The end of an epoch on rank 0, after the stage has validated and saved its model: log `row` for
    `epoch` (1-based), redraw the curves every `curves_every` epochs (0 = only at the end) but not within
    `CURVES_MIN_INTERVAL_S` of the last drawing, then write the resume
    point last (`modules()` gives the module states), so that a kill before it redoes this epoch."""
    if not dist.is_main():
        return
    assert logger is not None
    logger.log(step, row, epoch=epoch)
    now = time.monotonic()
    if curves_every and epoch % curves_every == 0 and now - logger.curves_drawn_at >= CURVES_MIN_INTERVAL_S:
        plot_curves(files.metrics, files.curves)
        logger.curves_drawn_at = now
    save_resume_point(files.state, modules(), optimizer, scaler, {"epoch": epoch, "step": step, **meta})


def finish_run(logger: MetricsLogger | None, files: RunFiles, t_start: float) -> None:
    """Close the metrics, draw the final curves and write DONE (the training seconds) on rank 0."""
    if logger:
        logger.close()
        plot_curves(files.metrics, files.curves)
    if dist.is_main():
        files.done.write_text(f"{time.time() - t_start:.1f}\n")


__all__ = ["Stepper", "begin_run", "close_epoch", "finish_run", "load_resume_point", "open_log", "save_resume_point"]
