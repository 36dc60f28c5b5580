"""Safe checkpoints: safetensors for tensors plus a JSON sidecar; atomic writes (temp file + rename).

Nothing here unpickles: weights load through safetensors, metadata through JSON. Every file carries a
`kind` ("vlm", "segmentation", "train_state", ...) so that a checkpoint of the wrong kind is refused
with a one-line error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dusss import __version__
from dusss.atomic import atomic_write_text, temp_file, umask_mode
from dusss.errors import CheckpointError

FORMAT = "dusss-checkpoint-v1"


def sidecar_path(path: str | Path) -> Path:
    """`model.safetensors` -> `model.json`."""
    return Path(path).with_suffix(".json")


def _storage_safe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; those sharing storage (tied weights, views) are cloned.

    safetensors refuses tensors that share memory, which tied weights (e.g. embeddings) do.
    """
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        flat[k] = t
    return flat


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict[str, Any]) -> None:
    """Save `tensors` to `path` (.safetensors) and `meta` (+ kind, format, version) to the JSON sidecar.

    Both files are written atomically; the sidecar last, so a sidecar always describes a complete file.
    The metadata is also embedded in the safetensors header: if a save is interrupted between the two
    renames, `load_checkpoint` notices the stale sidecar and uses the embedded copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = _storage_safe(tensors)
    full_meta = {"format": FORMAT, "kind": kind, "dusss_version": __version__, **meta}
    meta_json = json.dumps(full_meta, indent=2, default=str)
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"format": FORMAT, "kind": kind, "meta": meta_json})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_text(sidecar_path(path), meta_json)


def _prefer_embedded(sidecar: dict[str, Any], header: dict[str, str]) -> dict[str, Any]:
    """The metadata embedded in the safetensors header when it disagrees with the sidecar.

    They disagree only if a save was interrupted after the tensors' rename and before the sidecar's.
    """
    if header.get("format") != FORMAT or not header.get("meta"):
        return sidecar  # written by an older version: the sidecar is all there is
    try:
        embedded = json.loads(header["meta"])
    except json.JSONDecodeError:
        return sidecar
    return embedded if isinstance(embedded, dict) else sidecar


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and sidecar metadata; raise CheckpointError if missing, foreign or of another kind."""
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: no JSON sidecar {side.name}; not a dusss checkpoint")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise CheckpointError(f"{side}: sidecar is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dusss checkpoint (sidecar has no format {FORMAT!r})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = _prefer_embedded(meta, fh.metadata() or {})
            if meta.get("kind") not in kinds:
                raise CheckpointError(
                    f"{path}: is a {meta.get('kind')!r} checkpoint, expected {' or '.join(repr(k) for k in kinds)}"
                )
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({str(exc).splitlines()[0]})") from None
    return tensors, meta


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """`module.load_state_dict(state, strict=True)` with a one-line CheckpointError on mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(f"{path}: architecture differs from the checkpoint: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add `prefix.` to every key (to store several modules in one file)."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under `prefix.`, with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
