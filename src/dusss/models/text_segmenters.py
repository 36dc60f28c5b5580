"""Text-conditioned segmentation networks: the text-equipped, fully supervised baselines of the DuSSS paper's
Table 1 (its CLIP and LViT rows). Unlike the DuSSS student they need each image's report at inference.

* `ClipSegmenter` (`clip`; Radford et al., ICML 2021, as a dense segmenter in the manner of MaskCLIP/TCL): a
  frozen pre-trained VLM and a trained dense decoder. The mask is the per-pixel similarity of the decoded patch
  features to the report's embedding, z = κ·cos(v_f, t_f) + β: the text-mask generator of
  `dusss.models.grounding`, here trained on the masks alone (no L_tg, no unlabeled images).
* `LViTSegmenter` (`lvit`; Li et al., IEEE TMI 2023): LViT's U-Net with the report injected at every scale.
  LViT adds frozen-BERT text features, through trainable per-level projections, to the patch tokens of a
  ViT branch beside the CNN (PLAM modules). Ours keeps the CNN only and injects the text by FiLM
  (h·(1 + γ(t)) + b(t), zero-initialised: a plain U-Net at initialisation) after each of the nine stages; t is
  the mean of the frozen text encoder's word-piece states (all-MiniLM-L6-v2 by default). docs/method-notes.md.

Both: `forward(images [B,C,H,W], texts: list of B str) -> logits [B,1,H,W]` and `needs_text = True`. The
frozen encoders stay out of `state_dict()`: a checkpoint holds the trained parts, and its sidecar says how to
rebuild the frozen ones (the VLM checkpoint's path; the text encoder's config). A randomly initialised text
encoder (tests) cannot be rebuilt from a file, so its weights are kept in the state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dusss.config import from_dict, to_dict
from dusss.errors import CheckpointError
from dusss.models.grounding import TextMaskConfig, TextMaskGenerator
from dusss.models.text_condition import FiLM
from dusss.models.text_encoders import TextEncoderConfig, build_text_encoder
from dusss.models.unet import UNet, UNetConfig, stage_channels

__all__ = ["ClipSegmenter", "FrozenPartsModule", "LViTSegmenter"]


class FrozenPartsModule(nn.Module):
    """A module whose submodules under `frozen_prefixes` are frozen and left out of `state_dict()`;
    `load_state_dict` then expects exactly the other entries (strict) and keeps the frozen ones."""

    needs_text: ClassVar[bool] = True
    frozen_prefixes: tuple[str, ...] = ()

    def _is_frozen(self, key: str) -> bool:
        return bool(self.frozen_prefixes) and key.startswith(self.frozen_prefixes)

    def state_dict(self, *, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:  # type: ignore[override]
        out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in out if k.startswith(prefix) and self._is_frozen(k[len(prefix):])]:
            del out[key]
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        own = set(self.state_dict())
        if strict:
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise RuntimeError(f"{type(self).__name__}: state mismatch: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def train(self, mode: bool = True) -> FrozenPartsModule:
        """Train/eval the trained parts; the frozen ones always stay in `eval()`."""
        super().train(mode)
        for name, module in self.named_children():
            if self._is_frozen(name + "."):
                module.eval()
        return self


class ClipSegmenter(FrozenPartsModule):
    """Frozen VLM + trained dense decoder: z = κ·cos(decoded patch features, report embedding) + β."""

    frozen_prefixes = ("generator.vlm.",)

    def __init__(self, vlm: nn.Module, cfg: TextMaskConfig | None = None, vlm_path: str = "") -> None:
        super().__init__()
        self.generator = TextMaskGenerator(vlm, cfg)
        # L_tg's pooling mask (κ_m, β_m) and logit scale never run here: frozen, so that every trained
        # parameter gets a gradient in every step (DistributedDataParallel requires it)
        for p in (self.generator.pool_kappa, self.generator.pool_beta, self.generator.logit_scale):
            p.requires_grad_(False)
        self.vlm_path = vlm_path

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.generator(images, list(texts), with_tg=False)["logits"]

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(trained tensors, meta): the decoder and scalars; the VLM is rebuilt from `vlm` at load."""
        return dict(self.state_dict()), {"network": "clip", "text_mask": to_dict(self.generator.cfg),
                                         "vlm": self.vlm_path}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path,
                   vlm_path: str | Path | None = None) -> ClipSegmenter:
        """Rebuild from a checkpoint's tensors and sidecar; the frozen VLM from `vlm_path` or the sidecar's."""
        from dusss.checkpoint import load_state_into
        from dusss.models.vlm import VisionLanguageModel

        source = Path(vlm_path or meta.get("vlm") or "")
        if not str(source) or not source.is_file():
            raise CheckpointError(f"{path}: this CLIP-style model needs its frozen VLM, recorded as {str(source)!r}, "
                                  "which is not a file")
        cfg = from_dict(TextMaskConfig, meta.get("text_mask", {}), "text_mask")
        model = cls(VisionLanguageModel.from_checkpoint(source), cfg, str(source))
        load_state_into(model, tensors, path)
        return model


class LViTSegmenter(FrozenPartsModule):
    """LViT-style U-Net: the report's frozen text embedding modulates every stage by FiLM."""

    def __init__(self, unet: UNetConfig | None = None, text: TextEncoderConfig | None = None,
                 hf_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.unet = UNet(unet)
        self.text_cfg = text or TextEncoderConfig()
        self.text_encoder = build_text_encoder(self.text_cfg, hf_config)
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        self.frozen_prefixes = () if self.text_cfg.random_init else ("text_encoder.",)
        dim = self.text_encoder.out_dim
        self.films = nn.ModuleList(FiLM(dim, c) for c in stage_channels(self.unet.cfg.base_width))
        self._text_cache: dict[str, torch.Tensor] = {}  # frozen encoder: each distinct report encoded once

    @property
    def cfg(self) -> UNetConfig:
        return self.unet.cfg

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """`[B,D]`: the L2-normalised mean of the frozen encoder's word-piece states per report
        (sentence-transformers' pooling of all-MiniLM-L6-v2); an empty report gives zeros. Each distinct text is
        encoded once."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            self.text_encoder.eval()
            with torch.no_grad():
                out = self.text_encoder(new)
                w = out.attention_mask.unsqueeze(-1)
                mean = F.normalize((out.tokens * w).sum(1) / w.sum(1).clamp_min(1.0), dim=-1)
            self._text_cache.update({t: e.float().detach() for t, e in zip(new, mean)})
        return torch.stack([self._text_cache[t] for t in texts])

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """`.to()` / `.cuda()` / `.half()` also move (by clearing) the text-embedding cache."""
        self._text_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        if len(texts) != images.shape[0]:
            raise ValueError(f"{len(texts)} texts for {images.shape[0]} images: one report per image")
        t = self.text_embeddings(list(texts)).to(images.device)
        return self.unet(images, condition=lambda k, h: self.films[k](h, t))

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(trained tensors, meta): U-Net and FiLM layers; the frozen text encoder is rebuilt from `text`."""
        meta: dict[str, Any] = {"network": "lvit", "unet": dataclasses.asdict(self.unet.cfg),
                                "text": to_dict(self.text_cfg)}
        if self.text_cfg.random_init:  # its weights are in the state; the sidecar gives the architecture
            meta["text_hf_config"] = self.text_encoder.hf_config()
        return dict(self.state_dict()), meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> LViTSegmenter:
        """Rebuild from a checkpoint's tensors and sidecar (the text encoder from its config)."""
        from dusss.checkpoint import load_state_into

        try:
            unet = from_dict(UNetConfig, meta["unet"], "unet")
            text = from_dict(TextEncoderConfig, meta["text"], "text")
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: sidecar has no valid LViT config ({exc})") from None
        model = cls(unet, text, meta.get("text_hf_config"))
        load_state_into(model, tensors, path)
        return model
