"""Text-guided masks of Step 2 (paper eqs 10-12; METHOD §2.5, §3.6), written on logits.

* `GroundingDecoder` f_g (eq 10): each layer is `x ← up×2_nearest(x); x ← x + tanh(g)·Conv3×3(ReLU(x))` with a
  scalar gate g initialised to 0, so at initialisation the decoder is pure nearest upsampling (14 → 28 → 56).
  With `skip_channels > 0` (ours; 0 = the paper's f_g) a small trainable convolutional stem on the image adds
  full-resolution image features at every resolution of the decoder, `x ← x + P_k(avgpool(stem([image, u, v])))`
  (u, v: pixel coordinates),
  with zero-initialised 1×1 projections P_k (so f_g is unchanged at initialisation): the VLM's patch grid
  (4 × 4 for a 16-px ViT on 64-px images) is too coarse to outline lesions, and the stem lets f_g place the
  boundary while the text still chooses which regions light up.
* Text conditioning (`TextMaskConfig.text_condition`, ours; "none" = the paper): "film" modulates the decoder
  features by the text embedding after each skip fusion (`text_condition.FiLM`, so the modulated features know
  where they are); "prior" adds a coarse text → spatial logit map to z_text (`text_condition.TextPrior`). Both
  are zero-initialised: the generator equals the unconditioned one at initialisation.
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

from dusss.config import bounded, check, check_fields
from dusss.models.text_condition import FiLM, TextPrior

POOL_EPS = 1e-6
TEXT_CONDITIONS = ("none", "film", "prior")


def _tg_loss(pooled: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """L_tg (eq 12) through `dusss.losses.contrastive.extended_infonce`, imported lazily."""
    from dusss.losses.contrastive import extended_infonce

    return extended_infonce(pooled, text, scale)


def with_coordinates(image: torch.Tensor) -> torch.Tensor:
    """`[B,C,H,W] -> [B,C+2,H,W]`: the image with each pixel's row and column coordinate in [-1, 1] appended."""
    b, _, h, w = image.shape
    rows = torch.linspace(-1.0, 1.0, h, device=image.device, dtype=image.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(-1.0, 1.0, w, device=image.device, dtype=image.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([image, rows, cols], dim=1)


class GroundingDecoder(nn.Module):
    """f_g (eq 10): `n_layers` × [nearest ×2 upsample, x + tanh(g)·Conv3×3(ReLU(x))]; identity upsampling at init.

    `skip_channels > 0` adds image features from a trainable stem (Conv3×3-ReLU-Conv3×3-ReLU at the image's
    resolution, `skip_channels` wide, on RGB plus the pixel coordinates: `with_coordinates`), average-pooled to the grid and to every upsampled resolution and added
    through zero-initialised 1×1 projections; `forward` then needs the image.

    `film_dim > 0` modulates the features at the grid and every upsampled resolution (after the skip fusion) by
    a text embedding of that width (`FiLM`, identity at init); `forward` then needs `text`.
    """

    def __init__(self, dim: int, n_layers: int = 2, skip_channels: int = 0, film_dim: int = 0) -> None:
        super().__init__()
        check(dim >= 1, f"grounding decoder dim must be >= 1, got {dim}")
        check(n_layers >= 0, f"grounding decoder n_layers must be >= 0, got {n_layers}")
        check(skip_channels >= 0, f"grounding decoder skip_channels must be >= 0, got {skip_channels}")
        check(film_dim >= 0, f"grounding decoder film_dim must be >= 0, got {film_dim}")
        self.dim = dim
        self.n_layers = n_layers
        self.skip_channels = skip_channels
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size=3, padding=1) for _ in range(n_layers))
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(n_layers))
        self.stem: nn.Module | None = None
        self.skips = nn.ModuleList()
        if skip_channels:
            c = skip_channels
            # RGB + the pixel's (row, column) in [-1, 1] (CoordConv): reports name lungs and zones, so the
            # features the text is compared with must know where they are.
            self.stem = nn.Sequential(nn.Conv2d(3 + 2, c, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
            for _ in range(n_layers + 1):  # the token grid and every upsampled resolution
                proj = nn.Conv2d(c, dim, kernel_size=1)
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
                self.skips.append(proj)
        self.films = nn.ModuleList(FiLM(film_dim, dim) for _ in range(n_layers + 1) if film_dim)

    @property
    def scale_factor(self) -> int:
        return 2**self.n_layers

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, dim, h, w] -> [B, dim, h·2^n, w·2^n]`; `image` `[B,3,H,W]` is needed with skip features,
        `text` `[B, film_dim]` (one embedding per feature map) with FiLM."""
        feats = None
        if self.stem is not None:
            if image is None:
                raise ValueError("this grounding decoder has image skip features: pass the image")
            feats = self.stem(with_coordinates(image.to(x.dtype)))
        if len(self.films) and text is None:
            raise ValueError("this grounding decoder is text-conditioned (FiLM): pass the text embeddings")
        for k in range(self.n_layers + 1):
            if k:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                x = x + torch.tanh(self.gates[k - 1]) * self.convs[k - 1](F.relu(x))
            if feats is not None:
                x = x + self.skips[k](F.adaptive_avg_pool2d(feats, x.shape[-2:]))
            if len(self.films):
                x = self.films[k](x, text)
        return x


@dataclass
class TextMaskConfig:
    """Text-mask generator settings (defaults: METHOD §2.5/§3.6 recommendations, TCL's Sim2Mask init)."""

    decoder_layers: int = bounded(2, ge=0, le=64)
    # width of the image-skip stem of f_g (ours); 0 = the paper's f_g on VLM tokens only
    skip_channels: int = bounded(0, ge=0, le=4096)
    kappa_init: float = bounded(10.0, gt=0, le=1000)  # κ of z_text = κ·cos + β
    beta_init: float = bounded(-2.5, ge=-1000, le=1000)  # β
    learnable: bool = True  # κ, β, κ_m, β_m learnable (else fixed buffers)
    pool_kappa_init: float = bounded(10.0, gt=0, le=1000)  # κ_m of the L_tg pooling mask σ(κ_m·cos + β_m)
    pool_beta_init: float = bounded(-2.5, ge=-1000, le=1000)  # β_m
    tg_scale_init: float = bounded(1.0 / 0.07, gt=0, le=10_000)  # L_tg logit scale, learnable as log-scale
    tg_scale_max: float = bounded(100.0, gt=0, le=10_000)
    pairing: Literal["own", "mean"] = "own"  # "mean" = repro of METHOD §7.2 S2 (mean over the batch's texts)
    # How the text steers where the mask lights up (ours; "none" = the paper: only through cos(v_f, t_f)):
    # "film" = FiLM of f_g's features by t_f, "prior" = a text → prior_grid² logit map added to z_text
    text_condition: Literal["none", "film", "prior"] = "none"
    prior_grid: int = bounded(8, ge=1, le=256)  # side of the "prior" logit map (bilinearly upsampled)
    prior_hidden: int = bounded(64, ge=1, le=4096)  # hidden width of the "prior" MLP

    def __post_init__(self) -> None:
        check_fields(self, "text_mask")
        check(
            self.tg_scale_max >= self.tg_scale_init,
            f"text_mask.tg_scale_max must be >= tg_scale_init, got {self.tg_scale_max}",
        )
        check(self.pairing in ("own", "mean"), f"text_mask.pairing must be 'own' or 'mean', got {self.pairing!r}")
        check(self.text_condition in TEXT_CONDITIONS,
              f"text_mask.text_condition must be one of {TEXT_CONDITIONS}, got {self.text_condition!r}")
        check(not (self.text_condition != "none" and self.pairing == "mean"),
              "text_mask.pairing: mean (the released code's repro) needs text_condition: none")


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
    With `text_condition: film` the dense features depend on the text: L_tg then pools each image's features
    conditioned on its own text for all B texts of the batch (not B × B decoder passes).
    """

    def __init__(self, vlm: nn.Module, cfg: TextMaskConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TextMaskConfig()
        self.vlm = vlm
        self.vlm.requires_grad_(False)
        self.vlm.eval()
        self.dim = _embed_dim(vlm)
        film_dim = self.dim if self.cfg.text_condition == "film" else 0
        self.decoder = GroundingDecoder(self.dim, self.cfg.decoder_layers, self.cfg.skip_channels, film_dim)
        self.prior = (TextPrior(self.dim, self.cfg.prior_grid, self.cfg.prior_hidden)
                      if self.cfg.text_condition == "prior" else None)
        # The VLM is frozen, so a text's embedding never changes: each distinct text is encoded once
        # (a dataset has few distinct reports). Not part of the state dict.
        self._text_cache: dict[str, torch.Tensor] = {}
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
        """Parameters to optimise: f_g (FiLM included), the text prior, κ, β, κ_m, β_m and the L_tg logit scale
        (never the VLM)."""
        return [p for n, p in self.named_parameters() if not n.startswith("vlm.") and p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State without the VLM (decoder, scalars), for resuming."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vlm.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            hint = ""
            if any(k.startswith(("decoder.films.", "prior.")) for k in missing + unexpected):
                hint = (f" (this generator has text_mask.text_condition={self.cfg.text_condition!r}; the state was "
                        "saved with another one: build the generator with the checkpoint's text_condition, "
                        "'none' for runs that predate the option)")
            raise KeyError(f"text-mask state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}{hint}")
        self.load_state_dict(state, strict=False)

    def tg_scale(self) -> torch.Tensor:
        """L_tg logit scale exp(s), clamped at `tg_scale_max` (100)."""
        return self.logit_scale.exp().clamp(max=self.cfg.tg_scale_max)

    # -- computation -----------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features v_f = normalize(f_g(patch tokens)) `[B,d,h',w']` and text embeddings t_f `[N,d]`.

        The VLM runs frozen under `no_grad`; gradients reach f_g only. Text embeddings come from a cache
        filled once per distinct text (`text_embeddings`). With FiLM the features of image b are conditioned on
        text b (B = N), or the one image is conditioned on each of the N texts (`[N,d,h',w']`).
        """
        if isinstance(texts, str):
            texts = [texts]
        if self.vlm.training:  # (a recursive eval() per call costs ~3 ms)
            self.vlm.eval()
        with torch.no_grad():
            img = self.vlm.encode_image(images, with_global=False)
        local = img["local"]
        h, w = img["grid"]
        b, n, d = local.shape
        if n != h * w:
            raise ValueError(f"VLM returned {n} local tokens for a {h}x{w} grid")
        patch = local.float().transpose(1, 2).reshape(b, d, h, w)
        t = self.text_embeddings(list(texts)).to(patch.device)
        cond = None
        if len(self.decoder.films):
            if b == 1 and len(texts) > 1:  # one image, many prompts: one conditioned decoder pass per prompt
                patch = patch.expand(len(texts), -1, -1, -1)
                images = images.expand(len(texts), -1, -1, -1)
            elif b != len(texts):
                raise ValueError(f"{len(texts)} texts for {b} images: FiLM pairs each image with one text")
            cond = t
        v = F.normalize(self.decoder(patch, images, cond), dim=1)
        return v, t

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Normalised global text embeddings t_f `[N,d]` of the frozen VLM, each distinct text encoded once."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            self.vlm.eval()
            with torch.no_grad():
                emb = F.normalize(self.vlm.encode_text(new)["global"].float(), dim=-1)
            self._text_cache.update({t: e.detach() for t, e in zip(new, emb)})
        return torch.stack([self._text_cache[t] for t in texts])

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """`.to()` / `.cuda()` / `.half()` also move (by clearing) the text-embedding cache."""
        self._text_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _to_logits(self, cos: torch.Tensor, size: tuple[int, int], t: torch.Tensor) -> torch.Tensor:
        """κ·cos + β at image size, plus the text prior of the text embeddings `t` (one per row of `cos`)."""
        z = F.interpolate(self.kappa * cos + self.beta, size=size, mode="bilinear", align_corners=False)
        if self.prior is not None:
            z = z + F.interpolate(self.prior(t.to(z.dtype)), size=size, mode="bilinear", align_corners=False)
        return z

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
            logits = self._to_logits(cos_all.mean(dim=1, keepdim=True), images.shape[-2:], t)
        else:
            logits = self._to_logits(cos, images.shape[-2:], t)
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
        if v.shape[0] == n:  # each image (with FiLM: each text-conditioned copy of the one image) with its text
            cos = torch.einsum("bdhw,bd->bhw", v, t)
        else:
            cos = torch.einsum("dhw,nd->nhw", v[0], t)
        return self._to_logits(cos.unsqueeze(1), images.shape[-2:], t)
