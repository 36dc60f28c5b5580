"""Seeding and RNG state capture for reproducible, resumable runs.

`rng_state()` returns a plain JSON-able dict (torch states base64-encoded), so it fits in a checkpoint's
JSON sidecar; nothing here pickles. What it cannot capture: private generators
(`np.random.default_rng(...)`, `torch.Generator` objects held by datasets) and the RNGs inside
DataLoader worker processes. Those are re-derived from (seed, epoch) by the code that owns them.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

from dusss.errors import CheckpointError

_STATE_VERSION = 1


def seed_everything(seed: int) -> int:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and every CUDA device). Returns `seed`."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices (lazily)
    return seed


def worker_init_fn(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed `random` and NumPy from the worker's torch seed.

    torch gives every worker `base_seed + worker_id`, with `base_seed` drawn from the main process RNG,
    so workers differ from each other and from epoch to epoch, yet follow the run's seed.
    """
    del worker_id  # already folded into torch.initial_seed()
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    data = np.frombuffer(base64.b64decode(s.encode("ascii"), validate=True), dtype=np.uint8).copy()
    return torch.from_numpy(data)


def rng_state() -> dict[str, Any]:
    """Capture Python, NumPy, torch CPU and (if any) CUDA RNG states as a JSON-able dict."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "version": _STATE_VERSION,
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": _tensor_to_b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by `rng_state()`; a malformed dict raises CheckpointError.

    CUDA states are restored only when the same number of CUDA devices is visible (otherwise skipped).
    """
    try:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported version {state.get('version')!r}")
        py = state["python"]
        py_state = (int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"])
        npst = state["numpy"]
        np_state = (
            str(npst["name"]),
            np.asarray(npst["keys"], dtype=np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
        torch_state = _b64_to_tensor(state["torch"])
        cuda_states = [_b64_to_tensor(s) for s in state.get("cuda", [])]
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state in checkpoint is malformed ({exc})") from None
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)
