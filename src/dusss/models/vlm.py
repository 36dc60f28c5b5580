"""The Step-1 vision-language model: image and text encoders, MGCA-style heads, PDT Gaussian heads, momentum
(EMA) copies of both encoders and their heads, and a learnable temperature.

Interfaces (docs/architecture.md):
* `encode_image(images, momentum=False)` -> dict(global [B,d] unit, local [B,N,d] unit, grid (h,w),
  tokens [B,N,D] raw encoder tokens, cls [B,D_cls], cls_attention [B,N] or None)
* `encode_text(texts, momentum=False)` -> dict(global [B,d] unit, local [B,L,d] unit (0 at padding),
  mask [B,L], tokens, cls, cls_attention)
* `image_gaussians(enc)` / `text_gaussians(enc)` -> (mu, log sigma) [B,1+N,d] of the PDT over [global; local]
  (index 0 is the [CLS] Gaussian used by SSS); `gaussian_image(seq, mask)` / `gaussian_text(seq, mask)` raw.
* `update_momentum()` after `optimizer.step()`; `temperature()` -> tau (>= tau_min).
* `to_checkpoint() -> (tensors, meta)`; `VisionLanguageModel.from_checkpoint(path)` (kind "vlm").

The PDT heads are not momentum-copied: the online PDT is applied to momentum-branch sequences too, so it gets
gradient from both sides of every W2 (METHOD.md §7.5 sketch).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dusss.checkpoint import load_checkpoint, load_state_into
from dusss.config import bounded, check, check_fields, from_dict, to_dict
from dusss.errors import CheckpointError, ConfigError
from dusss.models.heads import PDT, GlobalHead, LocalHead
from dusss.models.image_encoders import ImageEncoderConfig, build_image_encoder
from dusss.models.text_encoders import TextEncoderConfig, build_text_encoder

MOMENTUM_PAIRS = (
    ("image_encoder", "image_encoder_m"),
    ("image_global", "image_global_m"),
    ("image_local", "image_local_m"),
    ("text_encoder", "text_encoder_m"),
    ("text_global", "text_global_m"),
    ("text_local", "text_local_m"),
)


@dataclass
class VLMConfig:
    """VLM architecture. Defaults: CPU-sized ViT, all-MiniLM-L6-v2, 128-d heads, PDT 8 heads, EMA 0.995,
    tau learnable from 0.07 with tau >= 0.01 (METHOD.md §3.8, §7.5)."""

    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = bounded(128, ge=2, le=16384)
    head_hidden: int = bounded(2048, ge=1, le=65536)
    head_norm: str = "batch"
    pdt_heads: int = bounded(8, ge=2, le=1024)
    pdt_mlp_ratio: float = bounded(4.0, gt=0, le=64)
    pdt_dropout: float = bounded(0.1, ge=0, lt=1)
    momentum: float = bounded(0.995, ge=0, lt=1)
    tau_init: float = bounded(0.07, gt=0, le=100)
    tau_min: float = bounded(0.01, gt=0, le=100)
    learn_tau: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "vlm")
        check(self.head_norm in ("batch", "layer"), f"head_norm must be 'batch' or 'layer', got {self.head_norm!r}")
        check(self.pdt_heads >= 2 and self.pdt_heads % 2 == 0 and self.embed_dim % self.pdt_heads == 0,
              f"pdt_heads must be even and divide embed_dim {self.embed_dim}, got {self.pdt_heads}")
        check(self.tau_init >= self.tau_min,
              f"need 0 < tau_min <= tau_init, got tau_min={self.tau_min} tau_init={self.tau_init}")


def _frozen_copy(module: nn.Module) -> nn.Module:
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is not None:  # share the tokenizer instead of deep-copying it
        module.tokenizer = None
    try:
        clone = copy.deepcopy(module)
    finally:
        if tokenizer is not None:
            module.tokenizer = tokenizer
    if tokenizer is not None:
        clone.tokenizer = tokenizer
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class VisionLanguageModel(nn.Module):
    """Image/text encoders + heads + PDT + momentum copies + learnable temperature (see module docstring)."""

    def __init__(self, cfg: VLMConfig | None = None, *, arch: dict[str, Any] | None = None) -> None:
        """`arch` (from a checkpoint's meta) rebuilds the architecture without reading pretrained weights."""
        super().__init__()
        cfg = cfg or VLMConfig()
        self.cfg = cfg
        rebuilding = arch is not None
        arch = arch or {}
        self.image_encoder = build_image_encoder(cfg.image, hf_config=arch.get("image"), load_weights=not rebuilding)
        self.text_encoder = build_text_encoder(cfg.text, hf_config=arch.get("text"))
        d, hid, norm = cfg.embed_dim, cfg.head_hidden, cfg.head_norm
        self.image_global = GlobalHead(self.image_encoder.cls_dim, d, hid, norm)
        self.image_local = LocalHead(self.image_encoder.out_dim, d, hid, norm)
        self.text_global = GlobalHead(self.text_encoder.out_dim, d, hid, norm)
        self.text_local = LocalHead(self.text_encoder.out_dim, d, hid, norm)
        self.pdt_image = PDT(d, cfg.pdt_heads, cfg.pdt_mlp_ratio, cfg.pdt_dropout, cfg.pdt_dropout)
        self.pdt_text = PDT(d, cfg.pdt_heads, cfg.pdt_mlp_ratio, cfg.pdt_dropout, cfg.pdt_dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.tau_init)), requires_grad=cfg.learn_tau)
        for online, mom in MOMENTUM_PAIRS:
            setattr(self, mom, _frozen_copy(getattr(self, online)))

    # ------------------------------------------------------------------ encoders
    def _branch(self, modality: str, momentum: bool) -> tuple[nn.Module, nn.Module, nn.Module]:
        suffix = "_m" if momentum else ""
        return (getattr(self, f"{modality}_encoder{suffix}"), getattr(self, f"{modality}_global{suffix}"),
                getattr(self, f"{modality}_local{suffix}"))

    def encode_image(self, images: torch.Tensor, momentum: bool = False,
                     with_attention: bool = False, with_global: bool = True) -> dict[str, Any]:
        """images [B,3,H,W] in [0,1] -> dict(global, local, grid, tokens, cls, cls_attention); the momentum
        branch runs without gradient. `with_global=False` returns the local tokens only (global and cls None):
        a CNN encoder then skips the stages that only its global feature needs (the text-mask generator)."""
        enc, ghead, lhead = self._branch("image", momentum)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not momentum):
            out = enc(images, return_attention=with_attention, with_cls=with_global)
            glob = F.normalize(ghead(out.cls), dim=-1) if with_global else None
            loc = F.normalize(lhead(out.tokens), dim=-1)
        return {"global": glob, "local": loc, "grid": out.grid, "tokens": out.tokens, "cls": out.cls,
                "cls_attention": out.cls_attention}

    def encode_text(self, texts: list[str], momentum: bool = False, with_attention: bool = False) -> dict[str, Any]:
        """texts (list[str]) -> dict(global, local, mask, tokens, cls, cls_attention); local is 0 at padding."""
        enc, ghead, lhead = self._branch("text", momentum)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not momentum):
            out = enc(list(texts), return_attention=with_attention)
            glob = F.normalize(ghead(out.cls), dim=-1)
            loc = F.normalize(lhead(out.tokens, out.attention_mask), dim=-1)
        return {"global": glob, "local": loc, "mask": out.attention_mask, "tokens": out.tokens, "cls": out.cls,
                "cls_attention": out.cls_attention}

    # ------------------------------------------------------------------ Gaussians (PDT)
    def gaussian_image(self, seq: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image PDT: seq [B,N,d] (mask [B,N]) -> (mu, log sigma) [B,N,d]."""
        return self.pdt_image(seq, mask)

    def gaussian_text(self, seq: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text PDT: seq [B,L,d] (mask [B,L]) -> (mu, log sigma) [B,L,d]."""
        return self.pdt_text(seq, mask)

    def image_gaussians(self, enc: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """PDT over [global; local] of an `encode_image` dict -> (mu, log sigma) [B,1+N,d]; index 0 = [CLS]."""
        seq = torch.cat([enc["global"][:, None], enc["local"]], dim=1)
        return self.pdt_image(seq, None)

    def text_gaussians(self, enc: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """PDT over [global; local] of an `encode_text` dict (padding masked) -> (mu, log sigma) [B,1+L,d]."""
        seq = torch.cat([enc["global"][:, None], enc["local"]], dim=1)
        ones = torch.ones_like(enc["mask"][:, :1])
        return self.pdt_text(seq, torch.cat([ones, enc["mask"]], dim=1))

    def temperature(self) -> torch.Tensor:
        """tau = exp(-logit_scale), clamped to >= tau_min (learnable log-scale temperature)."""
        return torch.exp(-self.logit_scale).clamp_min(self.cfg.tau_min)

    # ------------------------------------------------------------------ momentum
    @torch.no_grad()
    def update_momentum(self, momentum: float | None = None) -> None:
        """EMA online -> momentum encoders and heads (parameters and float buffers; integer buffers copied).
        Call once per optimizer step, after `optimizer.step()`."""
        m = self.cfg.momentum if momentum is None else momentum
        for online_name, mom_name in MOMENTUM_PAIRS:
            online, mom = getattr(self, online_name), getattr(self, mom_name)
            mom_params = dict(mom.named_parameters())
            for name, p in online.named_parameters():
                mom_params[name].mul_(m).add_(p.detach(), alpha=1.0 - m)
            mom_buffers = dict(mom.named_buffers())
            for name, b in online.named_buffers():
                if b.is_floating_point():
                    mom_buffers[name].mul_(m).add_(b, alpha=1.0 - m)
                else:
                    mom_buffers[name].copy_(b)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online weights into the momentum branch (momentum 0)."""
        self.update_momentum(0.0)

    # ------------------------------------------------------------------ checkpoints
    def architecture(self) -> dict[str, Any]:
        """What `from_checkpoint` needs besides the config to rebuild the modules without pretrained files."""
        return {"image": self.image_encoder.hf_config(), "text": self.text_encoder.hf_config()}

    def to_checkpoint(self, include_momentum: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) for `save_checkpoint(path, tensors, "vlm", meta)`. Momentum weights are included by
        default (resume needs them); Step 2 uses only the online parts."""
        mom_prefixes = tuple(f"{m}." for _, m in MOMENTUM_PAIRS)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                   if include_momentum or not k.startswith(mom_prefixes)}
        import transformers

        meta = {
            "vlm_config": to_dict(self.cfg),
            "architecture": self.architecture(),
            "has_momentum": include_momentum,
            "embed_dim": self.cfg.embed_dim,
            "image_encoder": {"kind": self.cfg.image.kind, "path": self.cfg.image.path,
                              "out_dim": self.image_encoder.out_dim, "cls_dim": self.image_encoder.cls_dim},
            "text_encoder": {"kind": self.cfg.text.kind, "path": self.cfg.text.path,
                             "out_dim": self.text_encoder.out_dim},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> VisionLanguageModel:
        """Rebuild a VLM saved with kind "vlm" (architecture from the sidecar, weights from the file), in eval
        mode. A checkpoint of another kind or a foreign file raises a one-line CheckpointError."""
        tensors, meta = load_checkpoint(path, "vlm")
        cfg_dict = meta.get("vlm_config")
        if not isinstance(cfg_dict, dict):
            raise CheckpointError(f"{path}: sidecar has no vlm_config; cannot rebuild the model")
        try:
            cfg = from_dict(VLMConfig, cfg_dict, where=f"{path}: vlm_config")
            model = cls(cfg, arch=meta.get("architecture") or {})
        except ConfigError as exc:
            raise CheckpointError(f"{path}: cannot rebuild the VLM ({exc})") from None
        if not meta.get("has_momentum", True):
            mom_prefixes = tuple(f"{m}." for _, m in MOMENTUM_PAIRS)
            load_state_into(_OnlineView(model, mom_prefixes), tensors, path)
            model.reset_momentum()
        else:
            load_state_into(model, tensors, path)
        return model.to(map_location).eval()


class _OnlineView(nn.Module):
    """A state-dict view of a VLM without its momentum modules (for checkpoints saved without them)."""

    def __init__(self, model: VisionLanguageModel, skip: tuple[str, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_skip", skip)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {k: v for k, v in self._model.state_dict().items() if not k.startswith(self._skip)}

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self._model.load_state_dict(state, strict=False)


__all__ = ["MOMENTUM_PAIRS", "VLMConfig", "VisionLanguageModel"]
