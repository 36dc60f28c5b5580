"""MC-Net: mutual consistency between two decoders that differ in their up-sampling (`mcnet`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dusss.methods.baselines.cct import UNetDecoder, student_config, student_features
from dusss.methods.perturb import strong_view
from dusss.methods.segmentation import SegMethod, SegMethodConfig, consistency_lambda, register_seg_method
from dusss.models.unet import DoubleConv

__all__ = ["BilinearUp", "MCNetMethod", "mutual_consistency", "sharpen"]


class BilinearUp(nn.Module):
    """MC-Net's bilinear up-sampling stage (their UpBlock, mode_upsampling 1): Conv1×1 deep → skip channels,
    bilinear ×2 (align_corners), concat the skip, 2 × ConvBNReLU (the U-Net's `DoubleConv`)."""

    def __init__(self, deep_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(deep_ch, skip_ch, kernel_size=1)
        self.conv = DoubleConv(2 * skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(x), scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([up, skip], dim=1))


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MC-Net's sharpening p^(1/T) / (p^(1/T) + (1 − p)^(1/T)) of a probability map (T < 1: towards 0/1)."""
    a = p.clamp(0.0, 1.0) ** (1.0 / temperature)
    b = (1.0 - p).clamp(0.0, 1.0) ** (1.0 / temperature)
    return a / (a + b).clamp_min(torch.finfo(p.dtype).tiny)


def mutual_consistency(p1: torch.Tensor, p2: torch.Tensor, temperature: float,
                       detach: bool = True) -> torch.Tensor:
    """½·[mean((p1 − sharpen(p2))²) + mean((p2 − sharpen(p1))²)]: each decoder towards the other's sharpened
    probabilities (detached targets unless `detach=False`, their code)."""
    t1, t2 = sharpen(p1, temperature), sharpen(p2, temperature)
    if detach:
        t1, t2 = t1.detach(), t2.detach()
    return 0.5 * (((p1 - t2) ** 2).mean() + ((p2 - t1) ** 2).mean())


@register_seg_method("mcnet")
class MCNetMethod(SegMethod):
    """MC-Net (Wu, Xu, Ge, Cai, Zhang: "Semi-supervised Left Atrium Segmentation with Mutual Consistency
    Training", MICCAI 2021), the 2-D version of their `train_mcnet_2d.py` (MCNet2d_v1: two decoders), binary.

    One encoder, two decoders: the student's own (transposed-convolution up-sampling) g₁ and `heads["decoder2"]`
    g₂ with bilinear up-sampling (`BilinearUp`). Both are supervised on the labeled images; on every image of the
    batch each is trained towards the other's sharpened probabilities, p_k = σ(z_k), T = `mcnet.temperature`:

        L = ½·[L_sup(z₁ˡ) + L_sup(z₂ˡ)] + λ(t)·½·[mean((p₁ − sg(S(p₂)))²) + mean((p₂ − sg(S(p₁)))²)],
        S(p) = p^(1/T) / (p^(1/T) + (1 − p)^(1/T))

    Departures: sigmoid instead of their two-class softmax (the same S and the same MSE for two classes);
    L_sup = Dice + BCE (their loss uses the Dice term only, the CE term is computed but not added); their sums
    over the two decoders and the two ordered pairs are means here (a common factor 2); the sharpened targets are
    detached as the paper's pseudo-labels (`mcnet.detach_targets`; their code lets gradient through them);
    the mean runs over the labeled and the unlabeled images' pixels together (`mcnet.consistency_on: all`, their
    whole batch), each seen in the passes `student_forward` says (theirs: one batch); their bilinear decoder is
    the first and the transposed one the second, here the student (exported) keeps the U-Net's transposed one.
    With `perturb.strong` the unlabeled images are the strong view for both decoders.
    """

    uses_unlabeled = True
    # train_mcnet_2d.py (ACDC): consistency 0.1, sigmoid ramp-up over consistency_rampup 200 "epochs" of 150
    # iterations = max_iterations 30000, i.e. the whole run; temperature 0.1 (`MCNetConfig`); weak view only.
    preset: ClassVar[dict[str, Any]] = {"semi.consistency_weight": 0.1, "semi.rampup_fraction": 1.0}

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        net = student_config(student)
        self.heads["decoder2"] = UNetDecoder(net.base_width, net.n_classes, block=BilinearUp)
        self.heads.to(self.device)

    def second_logits(self, feats: Any) -> torch.Tensor:
        """g₂'s logits on the student's encoder maps, cropped to the input size."""
        h, w = feats.size
        return self.heads["decoder2"](feats.encoder)[..., :h, :w]

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.mcnet
        x_l, y_l, has_l, _ = self._unpack(labeled)
        x_u = self._unpack(unlabeled)[0] if unlabeled is not None else None
        x_s = strong_view(x_u, self.cfg.perturb)[0] if x_u is not None else None
        z1_l, f_l, z1_u, f_u = student_features(self, x_l, x_s, self.cfg.perturb.strong)
        z2_l = self.second_logits(f_l)
        l_sup1 = self._sup_loss(z1_l, y_l, has_l)
        l_sup2 = self._sup_loss(z2_l, y_l, has_l)
        lam = consistency_lambda(self.cfg, step, total_steps)
        loss = 0.5 * (l_sup1 + l_sup2)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup1, "sup2": l_sup2, "lambda": lam}
        z1s, z2s = [], []
        if c.consistency_on == "all":
            z1s.append(z1_l)
            z2s.append(z2_l)
        if z1_u is not None and f_u is not None:
            z1s.append(z1_u)
            z2s.append(self.second_logits(f_u))
        if z1s:
            p1 = torch.cat([torch.sigmoid(z.float()).flatten() for z in z1s])
            p2 = torch.cat([torch.sigmoid(z.float()).flatten() for z in z2s])
            l_cons = mutual_consistency(p1, p2, c.temperature, detach=c.detach_targets)
            loss = loss + lam * l_cons
            logs["cons"] = l_cons
        logs["loss"] = loss
        return loss, self._floats(logs)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`student` (g₁) and `teacher` (g₂, whose sharpened probabilities train g₁) logits, eval mode."""
        out = super().pseudo_labels(images, texts)
        was = self.student.training, self.heads.training
        self.student.eval()
        self.heads.eval()
        try:
            _, feats = self.student(images.to(self.device), return_features=True)
            out["teacher"] = self.second_logits(feats)
        finally:
            self.student.train(was[0])
            self.heads.train(was[1])
        return out
