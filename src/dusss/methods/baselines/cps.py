"""CPS: cross pseudo supervision between two differently initialised U-Nets (`cps`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dusss.losses.segmentation import soft_bce
from dusss.methods.perturb import strong_view
from dusss.methods.segmentation import SegMethod, SegMethodConfig, consistency_lambda, register_seg_method
from dusss.models.batchnorm import frozen_running_stats
from dusss.models.ema import unwrap
from dusss.models.unet import UNet

__all__ = ["CrossPseudoSupervisionMethod", "cross_pseudo_loss", "hard_label"]


def hard_label(logits: torch.Tensor) -> torch.Tensor:
    """The detached hard pseudo-label 1[σ(z) ≥ 0.5] (= 1[z ≥ 0]) as float."""
    return (torch.sigmoid(logits.detach().float()) >= 0.5).float()


def cross_pseudo_loss(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE(z1, 1[σ(z2) ≥ ½]), BCE(z2, 1[σ(z1) ≥ ½])): each network against the other's detached hard label
    (mean over pixels and images)."""
    return soft_bce(z1, hard_label(z2)), soft_bce(z2, hard_label(z1))


@register_seg_method("cps")
class CrossPseudoSupervisionMethod(SegMethod):
    """CPS (Chen, Yuan, Zeng, Wang: "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision",
    CVPR 2021), 2-D binary version after SSL4MIS `train_cross_pseudo_supervision_2D.py`.

    Two U-Nets of the same architecture, the student f₁ and `heads["net2"]` f₂, initialised differently (f₂ is
    drawn under a generator seeded from torch's RNG), both trained; with y_k = 1[σ(z_k) ≥ 0.5] (no gradient):

        L = L_sup(z₁ˡ) + L_sup(z₂ˡ) + λ(t)·[BCE(z₁ᵘ, y₂ᵘ) + BCE(z₂ᵘ, y₁ᵘ)]
            (+ λ(t)·[BCE(z₁ˡ, y₂ˡ) + BCE(z₂ˡ, y₁ˡ)] with `cps.labeled`, as in the paper: L_cps = L_cps^l + L_cps^u)

    L_sup = Dice + BCE (`seg_loss`); ℓ_cps is BCE, the binary form of their cross-entropy on argmax labels.
    Departures: the paper's and SSL4MIS's softmax over classes becomes a sigmoid with a 0.5 threshold; SSL4MIS
    runs labeled and unlabeled images through each network in one batch and applies CPS to the unlabeled part
    only (`cps.labeled: false`), here each network sees them in the passes `student_forward` says; both networks
    share one optimizer (theirs: two SGD optimizers with the same schedule, equivalent); f₂ gets PyTorch's
    default initialisation like the student, with another draw (SSL4MIS 2-D does the same; the CPS code uses
    Kaiming-normal for both). With `perturb.strong` both networks see the same strong view (targets need no
    mixing); `perturb.feature_dropout` drops features in each network independently. Only the student is exported; f₂ is reported as the `teacher` of `pseudo_labels`.
    """

    uses_unlabeled = True
    # SSL4MIS: consistency 0.1, sigmoid ramp-up over consistency_rampup 200 "epochs" of 150 iterations
    # = max_iterations 30000, i.e. the whole run.
    preset: ClassVar[dict[str, Any]] = {"semi.consistency_weight": 0.1, "semi.rampup_fraction": 1.0}

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        net_cfg = unwrap(student).cfg  # construction time only (the student may be DDP-wrapped)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        with torch.random.fork_rng(devices=[]):  # one draw from the run's stream, whatever the net's size
            torch.manual_seed(seed)
            self.heads["net2"] = UNet(net_cfg)
        self.heads.to(self.device)

    @property
    def net2(self) -> nn.Module:
        return self.heads["net2"]

    def _net2_forward(self, x_l: torch.Tensor, x_u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """f₂'s logits on the labeled and unlabeled inputs, with the student's forward layout and BN rules."""
        net = self.net2
        if x_u is None:
            return net(x_l), None
        if self.cfg.student_forward == "joint" and x_l.shape[1:] == x_u.shape[1:]:
            z = net(torch.cat([x_l, x_u], dim=0))
            return z[: x_l.shape[0]], z[x_l.shape[0] :]
        pc = self.cfg.perturb
        frozen = not pc.bn_update_perturbed if pc.perturbs_student else not pc.bn_update_clean_unlabeled
        z_l = net(x_l)
        with frozen_running_stats(net, enabled=frozen):
            z_u = net(x_u, feature_dropout=pc.feature_dropout) if pc.feature_dropout > 0 else net(x_u)
        return z_l, z_u

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x_l, y_l, has_l, _ = self._unpack(labeled)
        x_u = self._unpack(unlabeled)[0] if unlabeled is not None else None
        # the same (weak or strong) view for both networks: their predictions are compared pixel by pixel
        x_s = strong_view(x_u, self.cfg.perturb)[0] if x_u is not None else None
        z1_l, z1_u = self._student_forward(x_l, x_s)
        z2_l, z2_u = self._net2_forward(x_l, x_s)
        l_sup1 = self._sup_loss(z1_l, y_l, has_l)
        l_sup2 = self._sup_loss(z2_l, y_l, has_l)
        lam = consistency_lambda(self.cfg, step, total_steps)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup1, "sup2": l_sup2, "lambda": lam}
        loss = l_sup1 + l_sup2
        cps = z1_l.sum() * 0.0
        if self.cfg.cps.labeled:
            a, b = cross_pseudo_loss(z1_l, z2_l)
            cps = cps + a + b
            logs["cps_l"] = a + b
        if z1_u is not None and z2_u is not None:
            a, b = cross_pseudo_loss(z1_u, z2_u)
            cps = cps + a + b
            logs["cps_u"] = a + b
            logs["agree_u"] = (hard_label(z1_u) == hard_label(z2_u)).float().mean()
        if "cps_l" in logs or "cps_u" in logs:
            loss = loss + lam * cps
            logs["cps"] = cps
        logs["loss"] = loss
        return loss, self._floats(logs)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`student` (f₁) and `teacher` (f₂, the network whose hard label trains the student) logits, eval mode."""
        out = super().pseudo_labels(images, texts)
        net = self.net2
        was_training = net.training
        net.eval()
        try:
            out["teacher"] = net(images.to(self.device))
        finally:
            net.train(was_training)
        return out
