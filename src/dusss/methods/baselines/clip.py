"""`clip`: the CLIP-style text-equipped baseline (frozen pre-trained VLM + trained dense decoder; see
`dusss.methods.baselines._text_supervised`)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from dusss.errors import ConfigError
from dusss.methods.baselines._text_supervised import TextSupervisedMethod
from dusss.methods.segmentation import SegMethodConfig, register_seg_method
from dusss.models.unet import UNetConfig


@register_seg_method("clip")
class ClipMethod(TextSupervisedMethod):
    """CLIP-style baseline: frozen pre-trained VLM + trained dense decoder; the report is needed at inference."""

    needs_vlm = True
    vlm_pretrain: ClassVar[str] = "clip"
    network: ClassVar[str] = "clip"

    @classmethod
    def build_student(cls, unet: UNetConfig, cfg: SegMethodConfig, vlm: nn.Module | None = None,
                      vlm_path: str = "") -> nn.Module:
        """`ClipSegmenter` around the frozen `vlm`, its decoder per `semi.text_mask`."""
        from dusss.models.text_segmenters import ClipSegmenter

        if vlm is None:
            raise ConfigError("method 'clip' needs a pretrained VLM (--vlm; `dusss pretrain --method clip`)")
        return ClipSegmenter(vlm, cfg.text_mask, vlm_path)


__all__ = ["ClipMethod"]
