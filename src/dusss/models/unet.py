"""The segmentation network of Step 2 (student and teacher): LViT's plain U-Net (METHOD §2.7), emitting logits.

Layout for base width w (paper: w = 64, 14,751,873 parameters):

| block    | operation                                              | channels        |
|----------|--------------------------------------------------------|-----------------|
| inc      | ONE Conv3x3 + BN + ReLU                                | in → w          |
| down1..4 | MaxPool2 + 2 × (Conv3x3 + BN + ReLU)                   | w→2w→4w→8w→8w   |
| up4..1   | ConvTranspose2d(c, c, 2, 2), concat skip, 2 × Conv     | 16w→4w→2w→w→w   |
| outc     | Conv1x1                                                | w → n_classes   |

The authors' model ends in a sigmoid; ours returns logits (sigmoid lives in the losses and metrics).
Inputs are `[B, in_channels, H, W]` images in [0, 1]; H and W that are not multiples of 16 are padded
(replicate) up to the next multiple and the output is cropped back, so any size works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dusss.config import bounded, check_fields

CHECKPOINT_KIND = "segmentation"
# `UNet.forward(condition=...)`: (stage index, stage output) -> the output the next stage reads
StageHook = Callable[[int, torch.Tensor], torch.Tensor]


def _identity(_stage: int, features: torch.Tensor) -> torch.Tensor:
    return features


def stage_channels(width: int) -> tuple[int, ...]:
    """Channels of the nine stage outputs `condition` sees: x1..x5 (w, 2w, 4w, 8w, 8w), up4..up1 (4w, 2w, w, w)."""
    return (width, 2 * width, 4 * width, 8 * width, 8 * width, 4 * width, 2 * width, width, width)


@dataclass
class UNetConfig:
    """U-Net size. `base_width=64` is the paper's network; 8-16 is enough for CPU smoke runs."""

    base_width: int = bounded(64, ge=1, le=1024)
    in_channels: int = bounded(3, ge=1, le=64)
    n_classes: int = bounded(1, ge=1, le=1024)

    def __post_init__(self) -> None:
        check_fields(self, "unet")


class ConvBNReLU(nn.Sequential):
    """Conv3x3 (padding 1, with bias, as in LViT) + BatchNorm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """2 × ConvBNReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(ConvBNReLU(in_ch, out_ch), ConvBNReLU(out_ch, out_ch))


class Down(nn.Sequential):
    """MaxPool2 then 2 × ConvBNReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))


class Up(nn.Module):
    """ConvTranspose2d(c, c, 2, 2) on the deeper map, concat the skip (c channels), then 2 × ConvBNReLU."""

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(deep_ch, deep_ch, kernel_size=2, stride=2)
        self.conv = DoubleConv(deep_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNetFeatures(NamedTuple):
    """What `UNet.forward(..., return_features=True)` exposes besides the logits."""

    encoder: tuple[torch.Tensor, ...]  # x1..x5: w, 2w, 4w, 8w, 8w channels at strides 1, 2, 4, 8, 16 (padded size)
    decoder: torch.Tensor  # the last decoder map before `outc` (w channels, padded size)
    size: tuple[int, int]  # (H, W) of the input before padding: crop a head's output with `[..., :H, :W]`


class UNet(nn.Module):
    """LViT's U-Net (METHOD §2.7); `forward(images [B,C,H,W]) -> logits [B,n_classes,H,W]`."""

    def __init__(self, cfg: UNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or UNetConfig()
        w = self.cfg.base_width
        self.inc = ConvBNReLU(self.cfg.in_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 8 * w)
        self.up4 = Up(8 * w, 8 * w, 4 * w)
        self.up3 = Up(4 * w, 4 * w, 2 * w)
        self.up2 = Up(2 * w, 2 * w, w)
        self.up1 = Up(w, w, w)
        self.outc = nn.Conv2d(w, self.cfg.n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, feature_dropout: float = 0.0, return_features: bool = False,
                condition: StageHook | None = None) -> torch.Tensor | tuple[torch.Tensor, UNetFeatures]:
        """Logits for `x`; `feature_dropout` > 0 drops whole channels (Dropout2d, always on) of every encoder
        feature before the decoder reads it: UniMatch's feature perturbation stream.

        `return_features=True` returns `(logits, UNetFeatures)`: the five encoder maps (after any feature dropout)
        and the decoder's last map before `outc`, at the padded size, for methods with extra heads (CCT's
        auxiliary decoders, MC-Net's second decoder, SS-Net's prototypes). They run through `forward`, so a
        DistributedDataParallel student still synchronises every gradient that reaches it through them.

        `condition(k, features)` (text-conditioned networks, `dusss.models.text_segmenters`) replaces the output of
        stage k: k = 0..4 the encoder maps x1..x5, k = 5..8 the outputs of up4..up1."""
        hook = condition or _identity
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 16, (-w) % 16
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x1 = hook(0, self.inc(x))
        x2 = hook(1, self.down1(x1))
        x3 = hook(2, self.down2(x2))
        x4 = hook(3, self.down3(x3))
        x5 = hook(4, self.down4(x4))
        if feature_dropout > 0:
            x1, x2, x3, x4, x5 = (F.dropout2d(f, feature_dropout, training=True) for f in (x1, x2, x3, x4, x5))
        y = hook(5, self.up4(x5, x4))
        y = hook(6, self.up3(y, x3))
        y = hook(7, self.up2(y, x2))
        last = hook(8, self.up1(y, x1))
        y = self.outc(last)
        if pad_h or pad_w:
            y = y[..., :h, :w]
        if return_features:
            return y, UNetFeatures((x1, x2, x3, x4, x5), last, (h, w))
        return y

    def num_parameters(self) -> int:
        """Number of parameters (paper: 14,751,873 at base width 64)."""
        return sum(p.numel() for p in self.parameters())

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) for `dusss.checkpoint.save_checkpoint(path, tensors, "segmentation", meta)`."""
        return dict(self.state_dict()), {"network": "unet", "unet": dataclasses.asdict(self.cfg)}

    @classmethod
    def load(cls, path: str | Path, prefix: str = "") -> tuple[UNet, dict[str, Any]]:
        """(U-Net, sidecar meta) from a "segmentation" checkpoint; `prefix` selects keys stored as `prefix.*`.
        The one U-Net loader: `from_checkpoint`, `dusss.models.networks.load_network` and
        `engine.train.load_segmentation_model` go through it (or through `from_parts`, its second half)."""
        from dusss.checkpoint import load_checkpoint, unprefixed

        tensors, meta = load_checkpoint(path, CHECKPOINT_KIND)
        return cls.from_parts(unprefixed(prefix, tensors) if prefix else tensors, meta, path), meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> UNet:
        """A U-Net from a checkpoint's tensors and sidecar meta (`path` names the file in errors)."""
        from dusss.checkpoint import load_state_into
        from dusss.config import from_dict
        from dusss.errors import CheckpointError, ConfigError

        try:
            cfg = from_dict(UNetConfig, meta["unet"], "unet")
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"{path}: sidecar has no valid U-Net config ({exc})") from None
        model = cls(cfg)
        load_state_into(model, tensors, path)
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path, prefix: str = "") -> UNet:
        """Rebuild a U-Net from a "segmentation" checkpoint (`load` without the meta)."""
        return cls.load(path, prefix)[0]
