"""UA-MT: Mean Teacher with the consistency restricted to the pixels where the teacher is certain."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from dusss.errors import ConfigError
from dusss.methods.perturb import Mix
from dusss.methods.segmentation import (
    MeanTeacherMethod,
    SegMethodConfig,
    register_seg_method,
    sigmoid_rampup,
)

__all__ = ["UAMTMethod", "binary_entropy", "uncertainty_masked_mse"]


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """−p ln p − (1 − p) ln(1 − p) per pixel (0 at p ∈ {0, 1}; ln 2 at p = ½): the 2-class predictive entropy."""
    p = p.float()
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


def uncertainty_masked_mse(student_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ m·(σ(z_s) − t)² / Σ m over the whole batch (0 with an intact graph when no pixel is kept).

    The binary form of SSL4MIS's Σ_c m·(softmax(z_s)_c − softmax(z_t)_c)² / (2 Σ m) with 2 classes: both
    channels carry the same squared difference, so the factor 2 cancels."""
    sq = (torch.sigmoid(student_logits.float()) - target.detach().float()) ** 2
    m = mask.detach().float()
    return (m * sq).sum() / (m.sum() + 1e-16)


@register_seg_method("uamt")
class UAMTMethod(MeanTeacherMethod):
    """UA-MT (Yu, Wang, Li, Fu, Heng: "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left
    Atrium Segmentation", MICCAI 2019), 2-D binary.

    Mean Teacher whose MSE consistency only counts the pixels where the EMA teacher is certain:
    p̄ = (1/T) Σ_t σ(f_teacher(x_u + ξ_t)), ξ_t = clamp(N(0, noise²), ±noise_clip) (T = `semi.uamt.passes`),
    u = H(p̄) (binary entropy), m = 1[u < τ(t)], τ(t) = (0.75 + 0.25·ramp(t))·ln 2 (ramp = sigmoid_rampup over
    the run), L = L_sup + λ(t)·Σ m·(σ(z_s) − σ(z_t))² / Σ m, with z_t the teacher's logits on its own noisy view
    (`perturb.teacher_noise`) and λ(t) the Mean-Teacher weight (`consistency_lambda`).

    Departures: one sigmoid logit, so the 2-class entropy is the binary entropy of p̄ and the 2-channel MSE its
    single-channel equivalent (same value, see `uncertainty_masked_mse`); the paper's 3-D V-Net with dropout
    + noise becomes the 2-D U-Net with input noise only (SSL4MIS's 2-D version); the labeled and unlabeled
    images go through the student in separate passes (`student_forward`), the teacher's BatchNorm uses batch
    statistics (`teacher_norm`), and with `perturb.strong` the student's CutMix is applied to the target and
    the mask alike (the authors' code has no strong view).
    """

    uses_unlabeled = True
    # SSL4MIS train_uncertainty_aware_mean_teacher_2D.py (the setting of its `mt` sibling): λ_max 0.1 over
    # consistency_rampup 200 "epochs" of 150 iterations = max_iterations 30000 (the whole run), MSE on
    # probabilities, EMA 0.99, teacher input noise clamp(N(0, 0.1²), ±0.2), soft targets, student on the
    # weak view; T = 8 and the threshold ramp are `semi.uamt.*` defaults.
    preset: ClassVar[dict[str, Any]] = {
        "semi.consistency": "mse", "semi.consistency_weight": 0.1, "semi.rampup_fraction": 1.0,
        "semi.ema_decay": 0.99, "semi.perturb.teacher_noise": 0.1, "semi.perturb.teacher_noise_clip": 0.2,
        "semi.perturb.pseudo_label": "soft",
    }

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        if cfg.consistency != "mse":
            raise ConfigError(f"uamt's consistency is the masked MSE of probabilities: semi.consistency must be "
                              f"mse, got {cfg.consistency!r}")
        if cfg.perturb.pseudo_label != "soft":
            raise ConfigError("uamt trains on the teacher's soft probabilities: perturb.pseudo_label must be soft")
        super().__init__(cfg, student, vlm)

    def threshold(self, step: int, total_steps: int) -> float:
        """τ(t) = (start + (end − start)·sigmoid_rampup(t, fraction·T))·ln 2."""
        u = self.cfg.uamt
        ramp = sigmoid_rampup(step, u.threshold_rampup_fraction * max(total_steps, 0))
        return (u.threshold_start + (u.threshold_end - u.threshold_start) * ramp) * math.log(2.0)

    @torch.no_grad()
    def uncertainty(self, x_u: torch.Tensor) -> torch.Tensor:
        """u = H(mean of `passes` teacher probabilities on noisy copies of `x_u`), [B, 1, H, W]. The passes run
        two copies of the batch per teacher call, as in SSL4MIS (the teacher's batch statistics see both)."""
        assert self.teacher is not None
        u = self.cfg.uamt
        total = torch.zeros((), device=x_u.device)
        done = 0
        while done < u.passes:
            n = min(2, u.passes - done)
            x = x_u.repeat(n, 1, 1, 1)
            if u.noise > 0:
                noise = torch.randn_like(x) * u.noise
                x = x + (noise.clamp(-u.noise_clip, u.noise_clip) if u.noise_clip > 0 else noise)
            p = torch.sigmoid(self.teacher(x).float())
            total = total + p.view(n, *x_u.shape[:1], *p.shape[1:]).sum(0)
            done += n
        return binary_entropy(total / u.passes)

    def _masked_term(self, z_s: torch.Tensor, x_u: torch.Tensor, mix: Mix | None,
                     tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked MSE, mask) of the student's unlabeled logits against the teacher (CutMixed like the view)."""
        target = torch.sigmoid(self._teacher_logits(x_u).float())
        mask = (self.uncertainty(x_u) < tau).float()
        if mix is not None:
            target, mask = mix.apply(target), mix.apply(mask)
        return uncertainty_masked_mse(z_s, target, mask), mask

    def _consistency(self, z_s: torch.Tensor, x_u: torch.Tensor, mix: Mix | None, step: int,
                     total_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The Mean Teacher's term masked to the pixels the teacher is certain of (threshold ramped)."""
        tau = self.threshold(step, total_steps)
        l_cons, mask = self._masked_term(z_s, x_u, mix, tau)
        return l_cons, {"threshold": tau, "certain": mask.mean()}
