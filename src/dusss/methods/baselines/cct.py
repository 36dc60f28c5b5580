"""CCT: cross-consistency training with auxiliary decoders on perturbed encoder features (`cct`).

Also home of two helpers the other decoder-based baselines (MC-Net, SS-Net) share: `UNetDecoder`, a copy of
the student U-Net's decoder reading the encoder maps, and `student_features`, the student's logits and
features on the labeled and unlabeled inputs under the `student_forward` layout and BatchNorm rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dusss.errors import ConfigError
from dusss.methods.perturb import strong_view
from dusss.methods.segmentation import SegMethod, SegMethodConfig, consistency_lambda, register_seg_method
from dusss.models.ema import unwrap
from dusss.models.unet import UNetFeatures, Up

__all__ = ["CCTMethod", "UNetDecoder", "aux_consistency", "feature_drop", "feature_noise", "student_features"]

PERTURBATIONS = ("noise", "dropout", "feature_drop")


class UNetDecoder(nn.Module):
    """The student U-Net's decoder layout (up4..up1 + 1×1 output conv, `dusss.models.unet`) as a separate
    module reading the encoder maps (x1..x5: w, 2w, 4w, 8w, 8w channels); `block(deep, skip, out)` builds each
    up-sampling stage (default: the U-Net's own `Up`, transposed convolution). Output at the padded size."""

    def __init__(self, width: int, n_classes: int = 1,
                 block: Callable[[int, int, int], nn.Module] = Up) -> None:
        super().__init__()
        w = width
        self.up4 = block(8 * w, 8 * w, 4 * w)
        self.up3 = block(4 * w, 4 * w, 2 * w)
        self.up2 = block(2 * w, 2 * w, w)
        self.up1 = block(w, w, w)
        self.outc = nn.Conv2d(w, n_classes, kernel_size=1)

    def forward(self, encoder: Sequence[torch.Tensor]) -> torch.Tensor:
        x1, x2, x3, x4, x5 = encoder
        y = self.up3(self.up4(x5, x4), x3)
        return self.outc(self.up1(self.up2(y, x2), x1))


def student_config(student: nn.Module) -> Any:
    """The U-Net config of `student` (possibly DDP-wrapped): construction time only."""
    cfg = getattr(unwrap(student), "cfg", None)
    if cfg is None or not hasattr(cfg, "base_width"):
        raise ConfigError("this method needs the U-Net student (dusss.models.unet.UNet) to build its decoders")
    return cfg


def _split(f: UNetFeatures, n: int) -> tuple[UNetFeatures, UNetFeatures]:
    enc_a, enc_b = zip(*((e[:n], e[n:]) for e in f.encoder))
    return UNetFeatures(tuple(enc_a), f.decoder[:n], f.size), UNetFeatures(tuple(enc_b), f.decoder[n:], f.size)


def student_features(method: SegMethod, x_l: torch.Tensor, x_u: torch.Tensor | None, perturbed: bool = False
                     ) -> tuple[torch.Tensor, UNetFeatures, torch.Tensor | None, UNetFeatures | None]:
    """(z_l, feats_l, z_u, feats_u): the student's logits and features (`return_features=True`, through its
    forward, so a DDP student synchronises them) on the labeled and unlabeled inputs. One joint pass with
    `student_forward: joint`, else two passes, the unlabeled one under `_perturbed_pass(perturbed)` (BatchNorm
    running statistics per `perturb.bn_update_*`); no feature dropout (the heads perturb the features)."""
    student = method.student
    if x_u is None:
        z_l, f_l = student(x_l, return_features=True)
        return z_l, f_l, None, None
    if method.cfg.student_forward == "joint" and x_l.shape[1:] == x_u.shape[1:]:
        z, f = student(torch.cat([x_l, x_u], dim=0), return_features=True)
        n = x_l.shape[0]
        f_l, f_u = _split(f, n)
        return z[:n], f_l, z[n:], f_u
    z_l, f_l = student(x_l, return_features=True)
    with method._perturbed_pass(perturbed):
        z_u, f_u = student(x_u, return_features=True)
    return z_l, f_l, z_u, f_u


def feature_noise(x: torch.Tensor, noise_range: float) -> torch.Tensor:
    """x + x·u with u ~ U(−r, r) drawn per element of one feature map and shared by the batch (CCT's
    FeatureNoise; SSL4MIS samples `x.shape[1:]` too)."""
    u = (torch.rand(x.shape[1:], device=x.device, dtype=x.dtype) * 2.0 - 1.0) * noise_range
    return x + x * u.unsqueeze(0)


def feature_drop(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Zero the most activated regions: the channel-mean map a, per image threshold γ·max(a) with one
    γ ~ U(low, high) for the batch, keep the pixels where a < threshold (CCT / SSL4MIS FeatureDropout)."""
    attention = x.mean(dim=1, keepdim=True)
    gamma = low + (high - low) * float(torch.rand(()))
    threshold = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1) * gamma
    return x * (attention < threshold).to(x.dtype)


def aux_consistency(main_logits: torch.Tensor, aux_logits: Sequence[torch.Tensor],
                    detach: bool = True) -> torch.Tensor:
    """(1/K)·Σ_k mean((σ(z_k) − σ(z_main))²): each auxiliary decoder's probabilities against the main
    decoder's (detached unless `detach=False`, SSL4MIS); the binary form of their softmax MSE (for two
    classes the squared differences of both channels are equal)."""
    target = torch.sigmoid(main_logits.float())
    if detach:
        target = target.detach()
    terms = [((torch.sigmoid(z.float()) - target) ** 2).mean() for z in aux_logits]
    return torch.stack(terms).mean()


@register_seg_method("cct")
class CCTMethod(SegMethod):
    """CCT (Ouali, Hudelot, Tami: "Semi-Supervised Semantic Segmentation with Cross-Consistency Training",
    CVPR 2020), the 2-D U-Net version of SSL4MIS `train_cross_consistency_training_2D.py` (UNet_CCT), binary.

    The student is the encoder and the main decoder g; K auxiliary decoders g_k (`heads["aux"]`, copies of the
    U-Net decoder) read perturbed copies π_k of all five encoder maps: feature noise x + x·U(±0.3), element-wise
    dropout (p = 0.3), feature drop (zero where the channel-mean map exceeds U(0.7, 0.9)·its maximum), one of each
    by default. With p = σ(g(e(x))), p_k = σ(g_k(π_k(e(x)))):

        L = mean_{g, g_1..g_K} L_sup(·ˡ) + λ(t)·(1/K)·Σ_k mean((p_kᵘ − sg(pᵘ))²)

    (`cct.aux_supervised`: the auxiliary decoders are supervised on the labeled images too, as SSL4MIS does;
    the CCT paper supervises the main decoder only). L_sup = Dice + BCE (`seg_loss`).
    Departures: sigmoid and binary MSE instead of their softmax; the consistency target is detached as in
    the CCT paper and code (`cct.detach_main`; SSL4MIS lets the MSE reach the main decoder too); SSL4MIS
    averages CE and Dice of the four decoders over 8 terms (= ½·the mean over decoders here, a common factor);
    CCT's VAT, context-masking, object-masking and guided-cutout decoders are left out (SSL4MIS 2-D leaves them
    out too; VAT would cost a power iteration per decoder); the CCT paper perturbs the encoder output only and
    its decoders are up-sampling heads, here (SSL4MIS) every skip map is perturbed and each decoder is a full
    U-Net decoder. Labeled and unlabeled images go through the student in the passes `student_forward` says
    (SSL4MIS: one batch); with `perturb.strong` the unlabeled pass sees the strong view (target and auxiliary
    predictions come from the same view, so no CutMix of targets). Only the student is exported.
    """

    uses_unlabeled = True
    # SSL4MIS train_cross_consistency_training_2D.py: consistency 0.1, sigmoid ramp-up over consistency_rampup
    # 200 "epochs" of 150 iterations = max_iterations 30000, i.e. the whole run; weak view only.
    preset: ClassVar[dict[str, Any]] = {"semi.consistency_weight": 0.1, "semi.rampup_fraction": 1.0}

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        net = student_config(student)
        c = cfg.cct
        self.perturbations: list[str] = (["noise"] * c.noise_decoders + ["dropout"] * c.dropout_decoders
                                         + ["feature_drop"] * c.feature_drop_decoders)
        self.heads["aux"] = nn.ModuleList(UNetDecoder(net.base_width, net.n_classes) for _ in self.perturbations)
        self.heads.to(self.device)

    def _perturb(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.cct
        if kind == "noise":
            return feature_noise(x, c.noise_range)
        if kind == "dropout":
            return F.dropout(x, c.dropout_rate, training=True)
        return feature_drop(x, *c.drop_threshold)

    def aux_logits(self, feats: UNetFeatures) -> list[torch.Tensor]:
        """Each auxiliary decoder's logits on its perturbed copy of the encoder maps (cropped to the input)."""
        h, w = feats.size
        return [dec([self._perturb(kind, e) for e in feats.encoder])[..., :h, :w]
                for kind, dec in zip(self.perturbations, self.heads["aux"])]

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.cct
        x_l, y_l, has_l, _ = self._unpack(labeled)
        x_u = self._unpack(unlabeled)[0] if unlabeled is not None else None
        x_s = strong_view(x_u, self.cfg.perturb)[0] if x_u is not None else None
        z_l, f_l, z_u, f_u = student_features(self, x_l, x_s, self.cfg.perturb.strong)
        l_main = self._sup_loss(z_l, y_l, has_l)
        lam = consistency_lambda(self.cfg, step, total_steps)
        logs: dict[str, torch.Tensor | float] = {"sup_main": l_main, "lambda": lam}
        if c.aux_supervised:
            l_aux = [self._sup_loss(z, y_l, has_l) for z in self.aux_logits(f_l)]
            l_sup = torch.stack([l_main, *l_aux]).mean()
            logs["sup_aux"] = torch.stack(l_aux).mean()
        else:
            l_sup = l_main
        logs["sup"] = l_sup
        loss = l_sup
        if z_u is not None and f_u is not None:
            l_cons = aux_consistency(z_u, self.aux_logits(f_u), detach=c.detach_main)
            loss = loss + lam * l_cons
            logs["cons"] = l_cons
        logs["loss"] = loss
        return loss, self._floats(logs)
