"""Devices, mixed precision, memory format, torch.compile and CPU threads.

`--precision fp32|bf16|fp16`: bf16 autocast works on CPU and on CUDA GPUs with bf16 support; fp16
needs CUDA (and a GradScaler, see `make_grad_scaler`). Errors are one-line ConfigErrors. On a CPU without
native bf16 (no AVX512-BF16 / AMX, e.g. an AVX2-only AMD EPYC) bf16 autocast runs, but emulated: a paper-size
U-Net step was ~12x slower than fp32 there (benchmarks/throughput.py), so the first bf16 autocast on such a
CPU warns once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any

import torch

from dusss.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); False when it cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _warn_if_emulated_bf16() -> None:
    """Warn, once per process (the cache), when bf16 autocast on this CPU is emulated."""
    if not cpu_has_native_bf16():
        warnings.warn(f"precision bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}) "
                      "is emulated and much slower than fp32 here; use --precision fp32", RuntimeWarning,
                      stacklevel=3)


def autocast_context(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Context for the forward pass: nothing for fp32, `torch.autocast` for bf16/fp16.

    fp16 on CPU, bf16 on a GPU without bf16 support, or an unknown precision raise ConfigError.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = _device_type(device)
    if kind == "cpu" and precision == "fp16":
        raise ConfigError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if kind == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16 is not supported by this GPU; use fp16 or fp32")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"precision {precision} is not supported on device type {kind!r}; use fp32")
    if kind == "cpu":
        _warn_if_emulated_bf16()
    return torch.autocast(device_type=kind, dtype=_DTYPES[precision])


def make_grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA (a pass-through otherwise).

    Always use it the same way: `scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`;
    `scaler.state_dict()` is JSON-able for the resume file.
    """
    kind = _device_type(device)
    enabled = precision == "fp16" and kind == "cuda"
    return torch.amp.GradScaler("cuda" if kind == "cuda" else "cpu", enabled=enabled)


def restore_grad_scaler(scaler: torch.amp.GradScaler, meta: dict[str, Any]) -> None:
    """Load the loss scale a resume file saved under meta["grad_scaler"] (from `scaler.state_dict()`).

    Without it a resumed fp16 run would restart at 2**16 and skip its first steps on overflow again.
    A no-op when the entry is missing or empty (older files, fp32/bf16 runs) or the scaler is disabled.
    """
    state = meta.get("grad_scaler")
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def maybe_channels_last(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Convert `model`'s 4-D parameters/buffers to channels_last in place when enabled; returns it."""
    if enabled:
        model.to(memory_format=torch.channels_last)
    return model


def channels_last_input(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """`x` in channels_last memory format when enabled and 4-D (inputs should match the model)."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x


def maybe_compile(model: torch.nn.Module, enabled: bool, **kwargs: Any) -> torch.nn.Module:
    """`torch.compile(model, **kwargs)` when enabled (compilation happens at the first call).

    The compiled wrapper prefixes state-dict keys with `_orig_mod.`: save `unwrap_model(model)`.
    """
    if not enabled:
        return model
    if not hasattr(torch, "compile"):
        raise ConfigError("torch.compile is not available in this torch version; drop --compile")
    return torch.compile(model, **kwargs)  # type: ignore[return-value]


def compile_inplace(module: torch.nn.Module, enabled: bool, **kwargs: Any) -> torch.nn.Module:
    """`module.compile(**kwargs)` when enabled: compiles the forward in place, so the module object, its
    state-dict keys and every reference to it (methods, EMA teachers, checkpoints) stay as they are.

    Compile after any `copy.deepcopy` of the module (EMA teachers, momentum encoders). Returns `module`.
    """
    if not enabled:
        return module
    if not hasattr(torch, "compile") or not hasattr(module, "compile"):
        raise ConfigError("torch.compile is not available in this torch version; drop --compile")
    module.compile(**kwargs)
    return module


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (`.module`) and/or torch.compile (`._orig_mod`) wrappers
    (`dusss.models.ema.unwrap`, the one implementation)."""
    from dusss.models.ema import unwrap

    return unwrap(model)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" (| "mps") → torch.device, with a ConfigError if unavailable.

    "auto" picks CUDA when available. Under torchrun, "auto"/"cuda" mean this process's GPU (LOCAL_RANK).
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {spec!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available "
                              f"(torch {torch.__version__}); use --device cpu")
        n = torch.cuda.device_count()
        index = dev.index
        if index is None:
            index = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        if index >= n:
            raise ConfigError(f"device cuda:{index} requested but only {n} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu")
        return dev
    raise ConfigError(f"device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")


def set_threads(n: int | None) -> int:
    """Use `n` intra-op CPU threads (None or 0: leave torch's default). Returns the thread count in use."""
    if n is not None and n < 0:
        raise ConfigError(f"threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()
