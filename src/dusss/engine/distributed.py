"""torchrun/DDP helpers: environment detection, rank queries, all-gather with gradient, reductions.

A single process (no torchrun) needs none of this: every helper degrades to the identity.
"""

from __future__ import annotations

import os

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


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


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


def sync_gradients(params: list[torch.nn.Parameter], average: bool = True) -> None:
    """All-reduce the gradients of `params` over ranks (mean by default, as DDP does); no-op in one process.

    Mean is right both for losses averaged over the local batch and for contrastive losses over features
    gathered with `gather_with_grad`. Parameters without a gradient on this rank contribute zeros.
    """
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if average:
            p.grad /= world_size()
