"""BCP: bidirectional copy-paste between labeled and unlabeled images in a Mean Teacher (`bcp`)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dusss.methods.segmentation import MeanTeacherMethod, SegMethodConfig, register_seg_method

__all__ = ["BidirectionalCopyPasteMethod", "box_mask", "copy_paste", "largest_component", "region_loss"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def box_mask(h: int, w: int, fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """M [1, 1, h, w]: ones with one zero box of int(fraction·h) × int(fraction·w) pixels (at least 1) at a
    uniform position (torch's RNG), BCP's zero-centred mask (their `generate_mask`, one box per batch)."""
    bh, bw = max(1, int(h * fraction)), max(1, int(w * fraction))
    top = int(torch.randint(0, h - bh + 1, ()))
    left = int(torch.randint(0, w - bw + 1, ()))
    m = torch.ones(1, 1, h, w, device=device)
    m[..., top : top + bh, left : left + bw] = 0
    return m


def copy_paste(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """a⊙M + b⊙(1 − M): `a` outside the zero box of M, `b` inside it (images or targets)."""
    m = m.to(a.dtype)
    return a * m + b * (1 - m)


def largest_component(labels: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected foreground component of each binary map in `labels` [B, 1, H, W] (BCP's
    `get_ACDC_2DLargestCC`, skimage's default connectivity); an empty map stays empty."""
    from scipy import ndimage

    arr = labels.detach().cpu().numpy() > 0.5
    out = np.zeros(arr.shape, dtype=np.float32)
    for i in range(arr.shape[0]):
        comp, n = ndimage.label(arr[i, 0], structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        out[i, 0] = comp == int(np.argmax(sizes)) + 1
    return torch.from_numpy(out).to(device=labels.device, dtype=labels.dtype)


def region_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor, kind: str = "dice_bce",
                rows: torch.Tensor | None = None, smooth: float = 1.0) -> torch.Tensor:
    """Loss over the pixels of `region` ([1 or B, 1, H, W] in {0, 1}) of the images `rows` ([B] bool, all if
    None), pooled over the batch as in their `mix_loss`: BCE averaged over those pixels and, for "dice_bce",
    ½·(1 − (2Σ w·p·t + s)/(Σ w·p + Σ w·t + s)) + ½·BCE with w = region·rows, p = σ(logits), s = `smooth`."""
    w = region.to(torch.float32).expand_as(logits)
    if rows is not None:
        w = w * rows.to(torch.float32).view(-1, 1, 1, 1)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    bce_r = (bce * w).sum() / w.sum().clamp_min(1.0)
    if kind == "bce":
        return bce_r
    p, t = torch.sigmoid(logits.float()) * w, target.float() * w
    dice = 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    return 0.5 * dice + 0.5 * bce_r


@register_seg_method("bcp")
class BidirectionalCopyPasteMethod(MeanTeacherMethod):
    """BCP (Bai, Chen, Li, Shen, Wang: "Bidirectional Copy-Paste for Semi-Supervised Medical Image
    Segmentation", CVPR 2023), 2-D binary version after their `ACDC_BCP_train.py`.

    One zero-box mask M per step (box of `box_fraction` = 2/3 of the side). With labeled (xˡ, y), unlabeled xᵘ
    and the EMA teacher's hard label ŷ = LCC(1[σ(z_t(xᵘ)) ≥ 0.5]) (largest connected component, detached):

        X_in  = xˡ_i⊙M + xᵘ_i⊙(1−M),  Y_in  = y_i⊙M + ŷ_i⊙(1−M)
        X_out = xᵘ_i⊙M + xˡ_j⊙(1−M),  Y_out = ŷ_i⊙M + y_j⊙(1−M)      (j = i + 1 mod n)
        L = ℓ_M(X_in, Y_in) + α·ℓ_{1−M}(X_in, Y_in) + α·ℓ_M(X_out, Y_out) + ℓ_{1−M}(X_out, Y_out)

    ℓ_R = ½·Dice_R + ½·BCE_R (`region_loss`), both over the pixels of region R pooled over the batch (as their
    masked Dice and cross-entropy), GT parts over the labeled images with a mask; α = `bcp.alpha` (0.5). Stage 1
    (the first `pretrain_fraction` = ¼ of the steps, their 10k pre-train of 40k iterations) trains on copy-paste
    among labeled images only, X = xˡ_i⊙M + xˡ_j⊙(1−M), L = ℓ_M + ℓ_{1−M}; at the first step of stage 2 the
    EMA teacher is reset to the student (their self-train starts both from the pre-trained weights). No separate
    L_sup and no λ(t) (their consistency weight is computed but unused).

    Departures: binary sigmoid outputs, the foreground Dice with smooth 1 and linear denominators (the repo's
    Dice) instead of their class-averaged softmax Dice (background included, squared denominators, smooth
    1e-10); `seg_loss: bce` keeps the BCE half only; their batches are split in halves (pairs (a, b)), here every image is
    used in both directions, paired by a roll; stage 1 continues from the last step instead of reloading the
    best validation checkpoint, in one run and one optimizer; the teacher follows the EMA (eq 13, warm-up by
    global step; their α = 0.99 constant) also during stage 1, only so that its pseudo-labels can be logged;
    the box may touch the border (their randint excludes the last offset). The student sees only the mixed
    images (BatchNorm running statistics from them, as in their code); `perturb.strong` is not used.
    """

    # Their code: EMA 0.99 of the full state dict (BN buffers too), teacher in train mode (batch statistics),
    # pre_iterations 10000 / max_iterations 30000, u_weight 0.5, box 2/3.
    preset: ClassVar[dict[str, Any]] = {"semi.ema_decay": 0.99, "semi.ema_buffers": "ema",
                                        "semi.teacher_norm": "batch", "semi.bcp.alpha": 0.5,
                                        "semi.bcp.pretrain_fraction": 0.25}

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        self.self_training = False  # stage 2 started (the teacher was reset to the student)

    def in_pretrain(self, step: int, total_steps: int) -> bool:
        """True while `step` lies in stage 1 (labeled copy-paste only)."""
        return step < self.cfg.bcp.pretrain_fraction * max(total_steps, 0)

    def reset_teacher(self) -> None:
        """Teacher := student (weights and buffers): an EMA step with α = 0."""
        assert self.teacher is not None
        self.teacher.update(self.student, 0)

    def pseudo_label(self, x_u: torch.Tensor) -> torch.Tensor:
        """ŷ: the teacher's hard label on `x_u`, reduced to its largest component with `largest_component`."""
        with torch.no_grad():
            y = (torch.sigmoid(self._teacher_logits(x_u).float()) >= 0.5).float()
        return largest_component(y) if self.cfg.bcp.largest_component else y

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return box_mask(x.shape[-2], x.shape[-1], self.cfg.bcp.box_fraction, x.device)

    def _labeled_copy_paste(self, x_l: torch.Tensor, y_l: torch.Tensor, has: torch.Tensor,
                            m: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Stage 1: ℓ_M + ℓ_{1−M} on xˡ_i⊙M + xˡ_j⊙(1−M) against y_i⊙M + y_j⊙(1−M), j = i + 1 mod B."""
        j = torch.roll(torch.arange(x_l.shape[0], device=x_l.device), -1)
        z = self.student(copy_paste(x_l, x_l[j], m))
        t = copy_paste(y_l, y_l[j], m)
        kind = self.cfg.seg_loss
        gt = region_loss(z, t, m, kind, rows=has) + region_loss(z, t, 1 - m, kind, rows=has[j])
        return gt, {"gt": gt}

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg.bcp
        x_l, y_l, has_l, _ = self._unpack(labeled)
        if y_l is None:
            y_l = torch.zeros_like(x_l[:, :1])
        pretrain = self.in_pretrain(step, total_steps)
        if not pretrain and not self.self_training:
            self.reset_teacher()
            self.self_training = True
        m = self._mask(x_l)
        logs: dict[str, torch.Tensor | float] = {"stage": 1.0 if pretrain else 2.0}
        if pretrain or unlabeled is None:
            loss, parts = self._labeled_copy_paste(x_l, y_l, has_l, m)
            logs.update(parts)
        else:
            x_u = self._unpack(unlabeled)[0]
            n = min(x_l.shape[0], x_u.shape[0])
            x_l, y_l, has_l, x_u = x_l[:n], y_l[:n], has_l[:n], x_u[:n]
            pl = self.pseudo_label(x_u)
            j = torch.roll(torch.arange(n, device=x_l.device), -1)
            z_in = self.student(copy_paste(x_l, x_u, m))
            z_out = self.student(copy_paste(x_u, x_l[j], m))
            t_in, t_out = copy_paste(y_l, pl, m), copy_paste(pl, y_l[j], m)
            kind = self.cfg.seg_loss
            gt = region_loss(z_in, t_in, m, kind, rows=has_l) + region_loss(z_out, t_out, 1 - m, kind, rows=has_l[j])
            unl = region_loss(z_in, t_in, 1 - m, kind) + region_loss(z_out, t_out, m, kind)
            loss = gt + cfg.alpha * unl
            logs.update({"gt": gt, "pl": unl, "pl_foreground": pl.mean()})
        logs["loss"] = loss
        return loss, self._floats(logs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The Mean-Teacher state plus the stage flag `bcp_self_training` (a resumed run does not reset again)."""
        state = super().state_dict()
        state["bcp_self_training"] = torch.tensor([float(self.self_training)])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)  # checks the keys against `state_dict()`, this flag included
        self.self_training = bool(state["bcp_self_training"].reshape(-1)[0] > 0.5)
