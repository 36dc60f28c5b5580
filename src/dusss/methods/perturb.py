"""Perturbations of the unlabeled batch shared by every teacher-student method (configuration, not copies).

The data loader's geometric augmentation gives the **weak view** (flip, rotation): the teacher (and the
text-mask generator) see it, optionally with Gaussian input noise (the SSL4MIS Mean Teacher). The
**strong view** for the student is built from the weak one on the tensor batch with photometric changes
only (brightness, contrast, gamma, Gaussian blur) and CutMix between the unlabeled images of the batch
(FixMatch / UniMatch). Geometry is therefore shared by both views, so the teacher's target needs no
warping; CutMix is applied to the teacher's target and confidence with the same boxes (`Mix.apply`).

All randomness comes from torch's global generator (seeded by the run, saved in the resume state), so
a seed fixes every view. Images are float [B, C, H, W] in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dusss.config import bounded, check, check_fields
from dusss.losses.segmentation import confident_hard_targets

__all__ = ["Mix", "PerturbConfig", "color_jitter", "cutmix", "gaussian_blur", "pseudo_targets",
           "strong_view", "teacher_view"]


@dataclass
class PerturbConfig:
    """How the unlabeled views differ. Defaults: no perturbation (student and teacher see the weak view).

    `pseudo_label`: `soft` targets σ(z_t) everywhere (Mean Teacher) or `hard` targets 1[σ(z_t) ≥ 0.5]
    kept where the teacher's confidence max(p, 1 − p) ≥ `confidence` (FixMatch / UniMatch, τ = 0.95).
    """

    teacher_noise: float = bounded(0.0, ge=0, le=10)  # std of Gaussian noise on the teacher's input (SSL4MIS: 0.1)
    teacher_noise_clip: float = bounded(0.0, ge=0, le=10)  # clamp of that noise to ±clip (SSL4MIS: 0.2); 0 = none
    strong: bool = False  # student sees the strong view (the photometric changes + CutMix below)
    jitter_p: float = bounded(0.8, ge=0, le=1)  # probability of brightness / contrast / gamma jitter per image
    brightness: float = bounded(0.4, ge=0, le=1)  # additive brightness shift uniform in ±brightness/2
    contrast: float = bounded(0.4, ge=0, lt=1)  # contrast factor uniform in [1 − contrast, 1 + contrast]
    gamma: float = bounded(0.3, ge=0, lt=1)  # gamma uniform in [1 − gamma, 1 + gamma]
    blur_p: float = bounded(0.5, ge=0, le=1)  # probability of a Gaussian blur per image
    blur_sigma: tuple[float, float] = bounded((0.1, 2.0), gt=0, le=100)  # blur σ range in pixels (UniMatch)
    # probability of a CutMix box per image (partner: the next image of the batch)
    cutmix_p: float = bounded(0.5, ge=0, le=1)
    cutmix_area: tuple[float, float] = bounded((0.02, 0.4), gt=0, le=1)  # box area / image area (UniMatch)
    # Dropout2d on the student's encoder features (UniMatch's FP stream: 0.5)
    feature_dropout: float = bounded(0.0, ge=0, lt=1)
    pseudo_label: Literal["soft", "hard"] = "soft"
    confidence: float = bounded(0.95, ge=0.5, lt=1)  # τ for hard pseudo-labels
    # BatchNorm running statistics from perturbed passes (strong views, dropped features): False (ours) keeps
    # them to the clean passes, the distribution eval mode sees; True = the authors' code (every pass updates)
    bn_update_perturbed: bool = False
    # BatchNorm running statistics from the student's pass over a clean (unperturbed) unlabeled batch: True (the
    # SSL4MIS Mean Teacher, whose joint batch updates them) or False, eval mode normalising with the labeled
    # passes' statistics only, those the weights were fitted under (docs/benchmarks.md, session 7)
    bn_update_clean_unlabeled: bool = True

    @property
    def perturbs_student(self) -> bool:
        """True when the student's unlabeled pass sees something other than the weak view."""
        return self.strong or self.feature_dropout > 0

    def __post_init__(self) -> None:
        check_fields(self, "perturb")
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        self.cutmix_area = tuple(float(v) for v in self.cutmix_area)  # type: ignore[assignment]
        check(len(self.blur_sigma) == 2 and self.blur_sigma[0] <= self.blur_sigma[1],
              f"perturb.blur_sigma must be [low, high] with 0 < low <= high, got {list(self.blur_sigma)}")
        check(len(self.cutmix_area) == 2 and self.cutmix_area[0] <= self.cutmix_area[1],
              f"perturb.cutmix_area must be [low, high] in (0, 1], got {list(self.cutmix_area)}")
        check(self.pseudo_label in ("soft", "hard"), f"perturb.pseudo_label must be soft or hard, got {self.pseudo_label!r}")


@dataclass
class Mix:
    """CutMix of a batch with its roll by one: out = x·(1 − box) + x[perm]·box."""

    box: torch.Tensor  # [B, 1, H, W] in {0, 1}
    perm: torch.Tensor  # [B] partner indices

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Mix `x` ([B, C, H, W], images, targets or confidences) with the same boxes and partners."""
        box = self.box.to(x.dtype)
        return x * (1 - box) + x[self.perm] * box


def teacher_view(x: torch.Tensor, cfg: PerturbConfig) -> torch.Tensor:
    """The teacher's input: the weak view plus N(0, teacher_noise²) noise, clamped to ±teacher_noise_clip."""
    if cfg.teacher_noise <= 0:
        return x
    noise = torch.randn_like(x) * cfg.teacher_noise
    if cfg.teacher_noise_clip > 0:
        noise = noise.clamp(-cfg.teacher_noise_clip, cfg.teacher_noise_clip)
    return x + noise


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device)


def color_jitter(x: torch.Tensor, cfg: PerturbConfig) -> torch.Tensor:
    """Per image, with probability jitter_p: contrast about the image mean, brightness shift, then gamma."""
    b, dev = x.shape[0], x.device
    on = (torch.rand(b, device=dev) < cfg.jitter_p).to(x.dtype).view(b, 1, 1, 1)
    c = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, dev).to(x.dtype).view(b, 1, 1, 1)
    s = _uniform(b, -cfg.brightness / 2, cfg.brightness / 2, dev).to(x.dtype).view(b, 1, 1, 1)
    g = _uniform(b, 1 - cfg.gamma, 1 + cfg.gamma, dev).to(x.dtype).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    y = ((x - mean) * c + mean + s).clamp(0, 1).pow(g)
    return on * y + (1 - on) * x


def _gauss_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, cfg: PerturbConfig) -> torch.Tensor:
    """Per image, with probability blur_p: a separable Gaussian blur with σ uniform in blur_sigma (reflect pad)."""
    out = x.clone()
    chosen = torch.rand(x.shape[0], device=x.device) < cfg.blur_p
    sigmas = _uniform(x.shape[0], cfg.blur_sigma[0], cfg.blur_sigma[1], x.device)
    c = x.shape[1]
    for i in torch.nonzero(chosen).flatten().tolist():
        k = _gauss_kernel(float(sigmas[i]), x.device, x.dtype)
        r = (k.numel() - 1) // 2
        img = x[i : i + 1]
        if min(img.shape[-2:]) <= r:  # too small to reflect-pad: leave unblurred
            continue
        img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        img = F.conv2d(F.pad(img, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
        out[i : i + 1] = img
    return out


def cutmix(x: torch.Tensor, cfg: PerturbConfig) -> Mix | None:
    """Random CutMix boxes (per image with probability cutmix_p, area in cutmix_area, aspect in [0.3, 1/0.3])
    pairing each image with the next one of the batch; None for a batch of one or when no box was drawn."""
    b, _, h, w = x.shape
    if b < 2 or cfg.cutmix_p <= 0:
        return None
    box = torch.zeros(b, 1, h, w, device=x.device)
    drawn = False
    for i in range(b):
        if float(torch.rand(())) >= cfg.cutmix_p:
            continue
        area = float(_uniform(1, *cfg.cutmix_area, x.device)) * h * w
        ratio = float(_uniform(1, 0.3, 1 / 0.3, x.device))
        bh = min(h, max(1, round(math.sqrt(area / ratio))))
        bw = min(w, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - bh + 1, ()))
        left = int(torch.randint(0, w - bw + 1, ()))
        box[i, :, top : top + bh, left : left + bw] = 1
        drawn = True
    if not drawn:
        return None
    return Mix(box=box, perm=torch.roll(torch.arange(b, device=x.device), -1))


def strong_view(x: torch.Tensor, cfg: PerturbConfig) -> tuple[torch.Tensor, Mix | None]:
    """The student's view of the weak batch `x`: itself when `strong` is off; else jitter, blur, CutMix."""
    if not cfg.strong:
        return x, None
    y = gaussian_blur(color_jitter(x, cfg), cfg)
    mix = cutmix(y, cfg)
    return (mix.apply(y) if mix is not None else y), mix


def pseudo_targets(teacher_logits: torch.Tensor, cfg: PerturbConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target, pixel weight) from detached teacher logits: soft σ(z) with no weight, or hard 1[σ(z) ≥ 0.5]
    with weight 1[max(p, 1 − p) ≥ confidence]."""
    p = torch.sigmoid(teacher_logits.detach().float())
    if cfg.pseudo_label == "soft":
        return p, None
    return confident_hard_targets(p, cfg.confidence)
