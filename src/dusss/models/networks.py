"""Segmentation networks by name, one loader for all, and one call that runs any of them.

* `unet` (`dusss.models.unet.UNet`): the student of every Step-2 method; images in, logits out.
* `clip`, `lvit` (`dusss.models.text_segmenters`): text-conditioned; they also take each image's report.

A "segmentation" checkpoint's sidecar names its network (`network`; sidecars written before the field existed
hold a U-Net). `segment(model, images, texts)` is what validation, evaluation, prediction and the FLOP count
call, so that none of them needs to know which network it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dusss.errors import CheckpointError
from dusss.models.ema import unwrap
from dusss.registry import Registry

# name -> loader(tensors, meta, path) -> module; filled below
SEG_NETWORKS: Registry[Callable[[dict[str, torch.Tensor], dict[str, Any], Path], nn.Module]] = Registry(
    "segmentation network")


def needs_text(model: nn.Module) -> bool:
    """True for a text-conditioned network (it takes the reports too), also inside DDP / compile wrappers."""
    return bool(getattr(unwrap(model), "needs_text", False))


def segment(model: nn.Module, images: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
    """Logits of `model` for `images`, with their reports where the network is text-conditioned (ValueError
    if those are missing)."""
    if not needs_text(model):
        return model(images)
    if texts is None or len(texts) != images.shape[0]:
        raise ValueError(f"this {type(unwrap(model)).__name__} needs one report per image at inference, got "
                         f"{0 if texts is None else len(texts)} for {images.shape[0]} image(s)")
    return model(images, [str(t) for t in texts])


def _load_unet(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> nn.Module:
    from dusss.models.unet import UNet

    return UNet.from_parts(tensors, meta, path)


def _load_clip(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> nn.Module:
    from dusss.models.text_segmenters import ClipSegmenter

    return ClipSegmenter.from_parts(tensors, meta, path)


def _load_lvit(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> nn.Module:
    from dusss.models.text_segmenters import LViTSegmenter

    return LViTSegmenter.from_parts(tensors, meta, path)


SEG_NETWORKS.add("unet", _load_unet)
SEG_NETWORKS.add("clip", _load_clip)
SEG_NETWORKS.add("lvit", _load_lvit)


def load_network(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(network, sidecar meta) from a "segmentation" checkpoint file, whichever network its sidecar names."""
    from dusss.checkpoint import load_checkpoint
    from dusss.models.unet import CHECKPOINT_KIND

    tensors, meta = load_checkpoint(path, CHECKPOINT_KIND)
    name = str(meta.get("network", "unet"))
    if name not in SEG_NETWORKS:
        raise CheckpointError(f"{path}: unknown network {name!r} in the sidecar; this dusss knows "
                              f"{SEG_NETWORKS.names()}")
    return SEG_NETWORKS[name](tensors, meta, Path(path)), meta


__all__ = ["SEG_NETWORKS", "load_network", "needs_text", "segment"]
