"""torchrun/DDP helpers: environment detection, the DistributedDataParallel wrapper, rank queries, all-gather
with gradient, reductions.

A single process (no torchrun) needs none of this: every helper degrades to the identity.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_MASTER_PORT = "29500"
# How long a collective may wait for the other ranks before the run fails (instead of hanging for ever);
# DUSSS_DIST_TIMEOUT_S overrides it (validation and checkpoint writes on rank 0 happen inside one wait).
DEFAULT_TIMEOUT_S = 1800


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """This process's torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): torchrun's
    own when WORLD_SIZE is set; else, under SLURM (`srun -n4 dusss train ...`), derived from SLURM_PROCID,
    SLURM_NTASKS and SLURM_LOCALID, with MASTER_ADDR from the environment or the launch node's address and
    MASTER_PORT from the environment or 29500; else {} (a single process)."""
    env = dict(os.environ if environ is None else environ)
    if env.get("WORLD_SIZE"):
        return {k: env[k] for k in LAUNCH_KEYS if k in env}
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        master = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": master,
                "MASTER_PORT": env.get("MASTER_PORT", DEFAULT_MASTER_PORT)}
    return {}


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the process group when launched by torchrun or srun (world size > 1), with a timeout
    (`DEFAULT_TIMEOUT_S`, or DUSSS_DIST_TIMEOUT_S). The launch variables are written into os.environ (under
    SLURM too), so every later rank query agrees. Returns True if it initialised the group."""
    if dist.is_available() and dist.is_initialized():
        return False
    env = launch_env()
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return False
    os.environ.update(env)
    spec = str(device).strip().lower()
    wants_cuda = spec.startswith("cuda") or spec == "auto"
    backend = "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    from datetime import timedelta

    timeout = timedelta(seconds=float(os.environ.get("DUSSS_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` inside `DistributedDataParallel` when a process group is up (itself in one process).

    DDP copies rank 0's parameters and buffers to every rank at wrap time and all-reduces the gradients
    (mean over ranks) in buckets overlapped with the backward pass; use `no_sync_unless(...)` around the
    micro-steps of gradient accumulation that must not communicate. Buffers are not re-broadcast at every
    forward (`broadcast_buffers=False`): BatchNorm running statistics are copied from rank 0 after each
    optimizer step (`broadcast_module(..., buffers_only=True)`), so ranks stay identical between steps.
    Every parameter must get a gradient in every step (no `find_unused_parameters`)."""
    if not is_distributed():
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def no_sync_unless(module: torch.nn.Module | None, sync: bool) -> Any:
    """`module.no_sync()` (gradients kept local) unless `sync`, for a DDP-wrapped module; else (a plain module,
    or None) a no-op context."""
    import contextlib

    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = rank(), x.shape[0]
        gathered = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(gathered, x.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B,...] from all ranks along dim 0, differentiably (the open_clip `gather_with_grad`).

    Every rank computes the same loss over the gathered batch; the backward pass sums each slice's gradient
    over ranks, so after averaging parameter gradients across ranks (DDP, or `sync_gradients`) the update
    equals the single-process update on the global batch, for the encoders and for parameters applied after
    the gather (the temperature) alike. Every rank must pass the same shape (equal per-rank batches).
    Under a single process this returns `x` itself.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in one process)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (identity in one process)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sync_gradients(params: list[torch.nn.Parameter], average: bool = True,
                   bucket_mb: float = 25.0) -> None:
    """All-reduce the gradients of `params` over ranks (mean by default, as DDP does); no-op in one process.

    Mean is right both for losses averaged over the local batch and for contrastive losses over features
    gathered with `gather_with_grad`. Every rank must pass the same list. A parameter without a gradient on
    some ranks contributes zeros there; one without a gradient on every rank keeps `grad = None`, so the
    optimizer skips it exactly as in one process. Gradients are flattened into buckets of about `bucket_mb`
    MB per dtype and device, so a model with hundreds of tensors costs a handful of collectives.
    """
    if not is_distributed():
        return
    n = world_size()
    params = list(params)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.SUM)
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    limit = int(bucket_mb * 2**20)
    for p, used in zip(params, has.tolist()):
        if not used:
            continue  # no rank produced a gradient: leave it None everywhere
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        key = (g.dtype, g.device)
        lists = buckets.setdefault(key, [[]])
        nbytes = g.numel() * g.element_size()
        if lists[-1] and sizes.get(key, 0) + nbytes > limit:
            lists.append([])
            sizes[key] = 0
        lists[-1].append(g)
        sizes[key] = sizes.get(key, 0) + nbytes
    for lists in buckets.values():
        for grads in lists:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            if average:
                flat /= n
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def broadcast_module(module: torch.nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy `module`'s parameters and buffers from rank `src` to all ranks (no-op in one process).

    Call it once after building a model (DDP does the same at wrap time), so that every rank starts from
    rank 0's weights whatever the seeds. With `buffers_only` (floating-point buffers only: BatchNorm running
    statistics), call it after each optimizer step to mirror DDP's `broadcast_buffers=True`.
    """
    if buffers_only:
        tensors = [b for b in module.buffers() if b.is_floating_point()]
    else:
        tensors = [*module.parameters(), *module.buffers()]
    broadcast_tensors(tensors, src)


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank `src`'s values, one flat collective per dtype and device
    (no-op in one process)."""
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.data.reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            offset = 0
            for t in group:
                t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """A list with every rank's picklable `obj`, in rank order (`[obj]` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_across_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on at least one (lets all ranks raise together)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def mean_over_ranks(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Per-key means of logged values over all ranks: sum of `sums[k]` ÷ sum of `counts[k]`.

    Keys may differ between ranks (a term logged only when present); a key's mean is over the ranks and
    steps that logged it. Every rank gets the same dict.
    """
    merged_s: dict[str, float] = {}
    merged_c: dict[str, int] = {}
    for s, c in all_gather_object((sums, counts)):
        for k, v in s.items():
            merged_s[k] = merged_s.get(k, 0.0) + float(v)
            merged_c[k] = merged_c.get(k, 0) + int(c.get(k, 0))
    return {k: merged_s[k] / max(merged_c[k], 1) for k in merged_s}
