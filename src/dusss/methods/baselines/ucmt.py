"""UCMT: collaborative mean teacher (two co-trained students + an EMA teacher) with uncertainty-guided region
mix (UMIX)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from dusss.losses.segmentation import seg_loss
from dusss.methods.baselines.cct import UNetDecoder, student_config
from dusss.methods.baselines.uamt import binary_entropy
from dusss.methods.perturb import strong_view
from dusss.methods.segmentation import (
    MeanTeacherMethod,
    SegMethodConfig,
    consistency_lambda,
    register_seg_method,
)
from dusss.models.batchnorm import frozen_running_stats

__all__ = ["UCMTMethod", "patch_grid", "patch_scores", "umix", "umix_order"]


def patch_grid(h: int, w: int, grid: int) -> tuple[int, int, int, int]:
    """(rows, cols, patch height, patch width) of the UMIX grid: patch side size // grid (at least 1 px); the
    strip left over at the bottom / right when the size is not a multiple is never moved."""
    ph, pw = max(1, h // grid), max(1, w // grid)
    return h // ph, w // pw, ph, pw


def patch_scores(u: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean of the uncertainty map `u` [B, 1, H, W] over each grid patch: [B, L], patches in row-major order."""
    b, _, h, w = u.shape
    nh, nw, ph, pw = patch_grid(h, w, grid)
    return u[:, 0, : nh * ph, : nw * pw].reshape(b, nh, ph, nw, pw).mean(dim=(2, 4)).reshape(b, nh * nw)


def umix_order(u1: torch.Tensor, u2: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch indices of each image sorted from the most to the least uncertain under u1 and u2 ([B, L] each)."""
    s1 = torch.sort(patch_scores(u1.float(), grid), dim=1, descending=True, stable=True).indices
    s2 = torch.sort(patch_scores(u2.float(), grid), dim=1, descending=True, stable=True).indices
    return s1, s2


def umix(tensors: Sequence[torch.Tensor], u1: torch.Tensor, u2: torch.Tensor, topk: int,
         grid: int) -> list[torch.Tensor]:
    """UMIX of each [B, C, H, W] tensor of `tensors` (image, label, pseudo-label: same moves for all), within each
    image: the k most uncertain patches under u1 take the content of the k least uncertain patches under u2,
    then the k most uncertain under u2 take that of the k least uncertain under u1 (the second move wins where
    both write). k = min(topk, L // 2), so the sources of both moves are never written (UCMT's train.py does
    the same two in-place assignments in this order)."""
    s1, s2 = umix_order(u1, u2, grid)
    k = min(topk, s1.shape[1] // 2)
    if k <= 0:
        return [t.clone() for t in tensors]
    moves = ((s1[:, :k], s2[:, -k:]), (s2[:, :k], s1[:, -k:]))  # (destination, source) patch indices
    out = []
    for t in tensors:
        b, c, h, w = t.shape
        nh, nw, ph, pw = patch_grid(h, w, grid)
        patches = (t[..., : nh * ph, : nw * pw].reshape(b, c, nh, ph, nw, pw).permute(0, 1, 2, 4, 3, 5)
                   .reshape(b, c, nh * nw, ph * pw))
        mixed = patches.clone()
        for dst, src in moves:
            dst_i, src_i = (i.view(b, 1, k, 1).expand(b, c, k, ph * pw) for i in (dst, src))
            mixed = mixed.scatter(2, dst_i, patches.gather(2, src_i))
        full = t.clone()
        full[..., : nh * ph, : nw * pw] = (mixed.reshape(b, c, nh, nw, ph, pw).permute(0, 1, 2, 4, 3, 5)
                                           .reshape(b, c, nh * ph, nw * pw))
        out.append(full)
    return out


def _hard(z: torch.Tensor) -> torch.Tensor:
    """Hard label 1[σ(z) ≥ ½] of logits, detached (the argmax of two classes)."""
    return (z.detach() >= 0).float()


@register_seg_method("ucmt")
class UCMTMethod(MeanTeacherMethod):
    """UCMT (Shen, Chen, Zhang, Zhou, Zhang, Gu: "Co-training with High-Confidence Pseudo Labels for
    Semi-supervised Medical Image Segmentation", IJCAI 2023), 2-D binary, after their `train.py`.

    Collaborative mean teacher: two students f₁ (the U-Net) and f₂ (`heads["decoder2"]`, a second U-Net decoder
    on f₁'s encoder), each supervised, each trained on the EMA teacher's hard label ŷ = 1[σ(z_t) ≥ ½] (CMT) and on
    the other's hard label (cross pseudo supervision), ℓ = L_sup's loss (`seg_loss`):

        L(x_l, y, x_u) = ℓ(f₁(x_l), y) + ℓ(f₂(x_l), y)
                         + λ(t)·(½[ℓ(f₁(a₁), ŷ) + ℓ(f₂(a₂), ŷ)] + ½[ℓ(f₁(a₁), ŷ₂) + ℓ(f₂(a₂), ŷ₁)])

    with a₁, a₂ two photometric views of x_u (the teacher sees x_u) and λ(t) = 0.1·ramp (their α·λ). UMIX then
    builds a second batch: uncertainty maps u_k = H(½(σ(z_k) + σ(z_t))) (binary entropy of the mean of student k
    and the teacher), per image a grid of patches; the top-k most uncertain patches under u₁ take the least
    uncertain ones under u₂ and vice versa (`umix`), in the image a₁ and in its label (y, or ŷ for unlabeled
    images); both students are trained with the same L on the mixed batch (one pass: f₁ and f₂ both read it).
    The loss of a step is the sum of both batches' L.

    Departures: their two students are two whole networks with their own optimizers and the teacher is the EMA
    of 0.99·f₁ + 0.01·f₂; here f₂ is a decoder sharing f₁'s encoder and the teacher is the EMA of f₁ alone (f₂'s
    1 % share dropped). Their iteration makes two optimizer steps (original, then UMIX batch); here one step on
    the sum. ℓ is Dice + BCE on one sigmoid logit (theirs: the 2-class Dice alone, `inter_weight` 1); the
    photometric views are `perturb`'s jitter + blur without CutMix (theirs: ColorJitter + GaussianBlur;
    `perturb.strong`, `cutmix_p` and `feature_dropout` are not used, `ucmt.strong_views` decides); the
    entropy is the binary one (theirs: the 2-class softmax entropy, the same value). No agreement or confidence
    mask is applied to ŷ: neither the paper's losses nor the code have one (the code's confidence maps are
    computed and unused); the "high-confidence" pseudo-labels come from UMIX. Labeled and unlabeled images go
    through the student in separate passes whatever `student_forward` says; whether the perturbed passes (views,
    UMIX) update the BatchNorm running statistics (f₂'s too) is `perturb.bn_update_perturbed` (preset: yes, their
    code).
    """

    uses_unlabeled = True
    # github:Senyh/UCMT train.py (ISIC, 2-D): unsupervised weight α = 0.1 times a sigmoid ramp-up over 5 of the
    # 25 epochs (rampup_length len(loader)·5, num_epochs 25 → 0.2 of the steps), EMA 0.99 with the warm-up
    # min(1 − 1/(t+1), 0.99); UMIX top-k 2 on a 16 × 16 grid (`UCMTConfig`); hard teacher labels. Every
    # student pass updates the BatchNorm running statistics as in their code (views and UMIX batches included:
    # on the phantom run, freezing them in those passes left the student at val Dice 0.20, against 0.49).
    preset: ClassVar[dict[str, Any]] = {
        "semi.consistency_weight": 0.1, "semi.rampup_fraction": 0.2, "semi.ema_decay": 0.99,
        "semi.perturb.bn_update_perturbed": True,
    }

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        net = student_config(student)
        self.heads["decoder2"] = UNetDecoder(net.base_width, net.n_classes)
        self.heads.to(self.device)

    # -- passes ----------------------------------------------------------------------------------------------
    def _frozen(self, perturbed: bool) -> contextlib.ExitStack:
        """The student's `_perturbed_pass` context, extended to f₂'s BatchNorm layers."""
        pc = self.cfg.perturb
        frozen = not pc.bn_update_perturbed if perturbed else not pc.bn_update_clean_unlabeled
        stack = contextlib.ExitStack()
        stack.enter_context(self._perturbed_pass(perturbed))
        stack.enter_context(frozen_running_stats(self.heads, enabled=frozen))
        return stack

    def students(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z₁, z₂): the U-Net's logits and f₂'s on its encoder maps, one student pass."""
        z1, feats = self.student(x, return_features=True)
        h, w = feats.size
        return z1, self.heads["decoder2"](feats.encoder)[..., :h, :w]

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """A photometric view (jitter + blur, no CutMix) when `ucmt.strong_views`, else `x` itself."""
        if not self.cfg.ucmt.strong_views:
            return x
        return strong_view(x, dataclasses.replace(self.cfg.perturb, strong=True, cutmix_p=0.0))[0]

    def _unsup(self, z1: torch.Tensor, z2: torch.Tensor, y_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cmt, L_cps): ½[ℓ(z₁, ŷ) + ℓ(z₂, ŷ)] and ½[ℓ(z₁, ŷ₂) + ℓ(z₂, ŷ₁)], hard detached targets."""
        kind = self.cfg.seg_loss
        l_cmt = 0.5 * (seg_loss(z1, y_t, kind) + seg_loss(z2, y_t, kind))
        l_cps = 0.5 * (seg_loss(z1, _hard(z2), kind) + seg_loss(z2, _hard(z1), kind))
        return l_cmt, l_cps

    @staticmethod
    def _uncertainty(z: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
        """H(½(σ(z) + p_t)): the entropy of a student's and the teacher's mean prediction (no gradient)."""
        return binary_entropy(0.5 * (torch.sigmoid(z.detach().float()) + p_t))

    # -- interface -------------------------------------------------------------------------------------------
    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.ucmt
        x_l, y_l, has_l, _ = self._unpack(labeled)
        x_u = self._unpack(unlabeled)[0] if unlabeled is not None else None
        lam = consistency_lambda(self.cfg, step, total_steps)
        use_umix = c.topk > 0

        # batch 1: the original images (students on the labeled weak view, on the photometric unlabeled views)
        z1_l, z2_l = self.students(x_l)
        l_sup = self._sup_loss(z1_l, y_l, has_l) + self._sup_loss(z2_l, y_l, has_l)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup, "lambda": lam}
        loss = l_sup
        if x_u is not None:
            with torch.no_grad():
                p_t = torch.sigmoid(self._teacher_logits(x_u).float())
            y_t = (p_t >= 0.5).float()
            a1 = self._view(x_u)
            with self._frozen(c.strong_views):
                if c.strong_views:
                    z1_u = self.students(a1)[0]
                    z2_u = self.students(self._view(x_u))[1]
                else:
                    z1_u, z2_u = self.students(x_u)
            l_cmt, l_cps = self._unsup(z1_u, z2_u, y_t)
            loss = loss + lam * (l_cmt + l_cps)
            logs.update({"cmt": l_cmt, "cps": l_cps})

        # batch 2: UMIX of the labeled view with its labels and of the unlabeled view a₁ with the teacher's labels
        if use_umix and y_l is not None and bool(has_l.any()):
            with torch.no_grad():
                p_t_l = torch.sigmoid(self._teacher_logits(x_l).float())
            xm_l, ym_l = umix([self._view(x_l), y_l.float()], self._uncertainty(z1_l, p_t_l),
                              self._uncertainty(z2_l, p_t_l), c.topk, c.grid)
            with self._frozen(True):
                zm1_l, zm2_l = self.students(xm_l)
            l_sup_m = self._sup_loss(zm1_l, ym_l, has_l) + self._sup_loss(zm2_l, ym_l, has_l)
            loss = loss + l_sup_m
            logs["umix_sup"] = l_sup_m
        if use_umix and x_u is not None:
            xm_u, ym_t = umix([a1, y_t], self._uncertainty(z1_u, p_t), self._uncertainty(z2_u, p_t), c.topk, c.grid)
            with self._frozen(True):
                zm1_u, zm2_u = self.students(xm_u)
            l_cmt_m, l_cps_m = self._unsup(zm1_u, zm2_u, ym_t)
            loss = loss + lam * (l_cmt_m + l_cps_m)
            logs.update({"umix_cmt": l_cmt_m, "umix_cps": l_cps_m})
        logs["loss"] = loss
        return loss, self._floats(logs)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`student` (f₁), `teacher` (the EMA teacher, whose hard labels train both) and `student2` (f₂) logits."""
        out = super().pseudo_labels(images, texts)
        was = self.student.training, self.heads.training
        self.student.eval()
        self.heads.eval()
        try:
            out["student2"] = self.students(images.to(self.device))[1]
        finally:
            self.student.train(was[0])
            self.heads.train(was[1])
        return out
