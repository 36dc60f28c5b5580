"""Text-guided masks of Step 2 (paper eqs 10-12; METHOD §2.5, §3.6), written on logits.

* `GroundingDecoder` f_g (eq 10): each layer is `x ← up×2_nearest(x); x ← x + tanh(g)·Conv3×3(ReLU(x))` with a
  scalar gate g initialised to 0, so at initialisation the decoder is pure nearest upsampling (14 → 28 → 56).
* `TextMaskGenerator`: a frozen VLM (every parameter `requires_grad=False`, always in `eval()`, encoded under
  `torch.no_grad()`) plus the trainable f_g and scalars:
  - text logits z_text = κ·cos(v_f, t_f) + β (eq 11 read on logits; κ = 10, β = −2.5 at init, learnable), using
    each image's **own** text (the diagonal of the image × text similarity), bilinearly upsampled to the image
    size; σ(z_text) is the text-guided mask y_u^text.
  - L_tg (eq 12): ExtendedInfoNCE on the mask-pooled dense features v_bn = Σ_p M_bn(p) v_f[b,p] / (Σ_p M_bn(p) + ε)
    with M_bn = σ(κ_m·cos_bn + β_m) for all B × B (image, text) pairs of the batch, a learnable logit scale
    (init 1/0.07, clamped at 100) and κ_m = 10, β_m = −2.5 (learnable). Computed on the local batch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dusss.config import check

POOL_EPS = 1e-6


def _tg_loss(pooled: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """L_tg (eq 12) through `dusss.losses.contrastive.extended_infonce`, imported lazily."""
    from dusss.losses.contrastive import extended_infonce

    return extended_infonce(pooled, text, scale)


class GroundingDecoder(nn.Module):
    """f_g (eq 10): `n_layers` × [nearest ×2 upsample, x + tanh(g)·Conv3×3(ReLU(x))]; identity upsampling at init."""

    def __init__(self, dim: int, n_layers: int = 2) -> None:
        super().__init__()
        check(dim >= 1, f"grounding decoder dim must be >= 1, got {dim}")
        check(n_layers >= 0, f"grounding decoder n_layers must be >= 0, got {n_layers}")
        self.dim = dim
        self.n_layers = n_layers
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size=3, padding=1) for _ in range(n_layers))
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(n_layers))

    @property
    def scale_factor(self) -> int:
        return 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, dim, h, w] -> [B, dim, h·2^n, w·2^n]`."""
        for conv, gate in zip(self.convs, self.gates):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = x + torch.tanh(gate) * conv(F.relu(x))
        return x


@dataclass
class TextMaskConfig:
    """Text-mask generator settings (defaults: METHOD §2.5/§3.6 recommendations, TCL's Sim2Mask init)."""

    decoder_layers: int = 2
    kappa_init: float = 10.0  # κ of z_text = κ·cos + β
    beta_init: float = -2.5  # β
    learnable: bool = True  # κ, β, κ_m, β_m learnable (else fixed buffers)
    pool_kappa_init: float = 10.0  # κ_m of the L_tg pooling mask σ(κ_m·cos + β_m)
    pool_beta_init: float = -2.5  # β_m
    tg_scale_init: float = 1.0 / 0.07  # L_tg logit scale, learnable as log-scale
    tg_scale_max: float = 100.0
    pairing: Literal["own", "mean"] = "own"  # "mean" = repro of METHOD §7.2 S2 (mean over the batch's texts)

    def __post_init__(self) -> None:
        check(self.decoder_layers >= 0, f"text_mask.decoder_layers must be >= 0, got {self.decoder_layers}")
        check(self.kappa_init > 0, f"text_mask.kappa_init must be > 0, got {self.kappa_init}")
        check(self.pool_kappa_init > 0, f"text_mask.pool_kappa_init must be > 0, got {self.pool_kappa_init}")
        check(self.tg_scale_init > 0, f"text_mask.tg_scale_init must be > 0, got {self.tg_scale_init}")
        check(
            self.tg_scale_max >= self.tg_scale_init,
            f"text_mask.tg_scale_max must be >= tg_scale_init, got {self.tg_scale_max}",
        )
        check(self.pairing in ("own", "mean"), f"text_mask.pairing must be 'own' or 'mean', got {self.pairing!r}")


def _embed_dim(vlm: nn.Module) -> int:
    cfg = getattr(vlm, "cfg", None)
    dim = getattr(cfg, "embed_dim", None) if cfg is not None else None
    if dim is None:
        dim = getattr(vlm, "embed_dim", None)
    if not isinstance(dim, int):
        raise TypeError("the VLM exposes no integer cfg.embed_dim")
    return dim


class TextMaskGenerator(nn.Module):
    """Frozen VLM + trainable f_g, (κ, β), (κ_m, β_m) and L_tg logit scale (eqs 10-12).

    `forward(images [B,3,H,W], texts: list of B str)` returns
    `dict(logits=[B,1,H,W] own-text z_text, loss_tg=scalar (eq 12, or None if with_tg=False), cos=[B,1,h,w])`.
    """

    def __init__(self, vlm: nn.Module, cfg: TextMaskConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TextMaskConfig()
        self.vlm = vlm
        self.vlm.requires_grad_(False)
        self.vlm.eval()
        self.dim = _embed_dim(vlm)
        self.decoder = GroundingDecoder(self.dim, self.cfg.decoder_layers)
        scalars = {
            "kappa": self.cfg.kappa_init,
            "beta": self.cfg.beta_init,
            "pool_kappa": self.cfg.pool_kappa_init,
            "pool_beta": self.cfg.pool_beta_init,
        }
        for name, value in scalars.items():
            t = torch.tensor(float(value))
            if self.cfg.learnable:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(self.cfg.tg_scale_init)))

    # -- modes and state -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TextMaskGenerator:
        """Train/eval the trainable parts; the VLM always stays in `eval()`."""
        super().train(mode)
        self.vlm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimise: f_g, κ, β, κ_m, β_m and the L_tg logit scale (never the VLM)."""
        return [p for n, p in self.named_parameters() if not n.startswith("vlm.") and p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State without the VLM (decoder, scalars), for resuming."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vlm.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"text-mask state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict(state, strict=False)

    def tg_scale(self) -> torch.Tensor:
        """L_tg logit scale exp(s), clamped at `tg_scale_max` (100)."""
        return self.logit_scale.exp().clamp(max=self.cfg.tg_scale_max)

    # -- computation -----------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features v_f = normalize(f_g(patch tokens)) `[B,d,h',w']` and text embeddings t_f `[N,d]`.

        The VLM runs frozen under `no_grad`; gradients reach f_g only.
        """
        if isinstance(texts, str):
            texts = [texts]
        self.vlm.eval()
        with torch.no_grad():
            img = self.vlm.encode_image(images)
            txt = self.vlm.encode_text(list(texts))
        local = img["local"]
        h, w = img["grid"]
        b, n, d = local.shape
        if n != h * w:
            raise ValueError(f"VLM returned {n} local tokens for a {h}x{w} grid")
        patch = local.float().transpose(1, 2).reshape(b, d, h, w)
        v = F.normalize(self.decoder(patch), dim=1)
        t = F.normalize(txt["global"].float(), dim=-1)
        return v, t

    def _to_logits(self, cos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        z = self.kappa * cos + self.beta
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, texts: list[str], with_tg: bool = True) -> dict[str, Any]:
        """Own-text text logits z_text = κ·cos_bb + β at image size, L_tg (eq 12) and the dense cos map."""
        b = images.shape[0]
        if len(texts) != b:
            raise ValueError(f"{len(texts)} texts for {b} images; forward pairs each image with its own text")
        v, t = self.encode(images, texts)
        need_all = with_tg or self.cfg.pairing == "mean"
        if need_all:
            cos_all = torch.einsum("bdhw,nd->bnhw", v, t)  # [B,B,h,w]
            idx = torch.arange(b, device=v.device)
            cos = cos_all[idx, idx].unsqueeze(1)
        else:
            cos = torch.einsum("bdhw,bd->bhw", v, t).unsqueeze(1)
        if self.cfg.pairing == "mean":
            logits = self._to_logits(cos_all.mean(dim=1, keepdim=True), images.shape[-2:])
        else:
            logits = self._to_logits(cos, images.shape[-2:])
        loss_tg = None
        if with_tg:
            mask = torch.sigmoid(self.pool_kappa * cos_all + self.pool_beta)  # M_bn, [B,N,h,w]
            pooled = torch.einsum("bnhw,bdhw->bnd", mask, v) / (mask.sum(dim=(2, 3)).unsqueeze(-1) + POOL_EPS)
            loss_tg = _tg_loss(F.normalize(pooled, dim=-1), t, self.tg_scale())
        return {"logits": logits, "loss_tg": loss_tg, "cos": cos}

    def text_logits(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """z_text `[N,1,H,W]` for arbitrary prompts: one image and N texts, or N images with their own texts.

        Gradients are not disabled here: wrap the call in `torch.no_grad()` for inference (`dusss textmap`).
        """
        if isinstance(texts, str):
            texts = [texts]
        b, n = images.shape[0], len(texts)
        if b != n and b != 1:
            raise ValueError(f"{n} texts for {b} images: give one image or one text per image")
        v, t = self.encode(images, texts)
        if b == n:
            cos = torch.einsum("bdhw,bd->bhw", v, t)
        else:
            cos = torch.einsum("dhw,nd->nhw", v[0], t)
        return self._to_logits(cos.unsqueeze(1), images.shape[-2:])
