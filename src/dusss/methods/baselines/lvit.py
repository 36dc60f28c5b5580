"""`lvit`: the LViT-style text-equipped baseline (U-Net with the report's frozen text embedding at every stage;
see `dusss.methods.baselines._text_supervised`)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from dusss.methods.baselines._text_supervised import TextSupervisedMethod
from dusss.methods.segmentation import SegMethodConfig, register_seg_method
from dusss.models.unet import UNetConfig


@register_seg_method("lvit")
class LViTMethod(TextSupervisedMethod):
    """LViT-style baseline: U-Net with the report's frozen text embedding at every stage; report needed at inference."""

    network: ClassVar[str] = "lvit"

    @classmethod
    def build_student(cls, unet: UNetConfig, cfg: SegMethodConfig, vlm: nn.Module | None = None,
                      vlm_path: str = "") -> nn.Module:
        """`LViTSegmenter` of U-Net size `unet` with the frozen text encoder `semi.lvit.text`."""
        from dusss.models.text_segmenters import LViTSegmenter

        return LViTSegmenter(unet, cfg.lvit.text)


__all__ = ["LViTMethod"]
