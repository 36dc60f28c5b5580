"""SS-Net: pixel-level smoothness (VAT) and inter-class separation with prototypes (`ssnet`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dusss.methods.baselines.cct import student_config, student_features
from dusss.methods.segmentation import SegMethod, SegMethodConfig, consistency_lambda, register_seg_method

__all__ = ["PrototypeMemory", "SSNetMethod", "l2_normalize", "prototype_distance", "soft_dice_distance",
           "vat_perturbation"]


def l2_normalize(d: torch.Tensor) -> torch.Tensor:
    """Each image's perturbation scaled to unit L2 norm over all its values (their `_l2_normalize`)."""
    return d / (d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1))) + 1e-8)


def soft_dice_distance(p_hat: torch.Tensor, p: torch.Tensor, smooth: float = 1e-10) -> torch.Tensor:
    """Their `softDiceLoss` between two probability maps, binary: the mean over the two classes (p and 1 − p)
    of 1 − (2Σst + s)/(Σs² + Σt² + s), the sums over the whole batch."""
    terms = []
    for s, t in ((p_hat, p), (1.0 - p_hat, 1.0 - p)):
        terms.append(1.0 - (2.0 * (s * t).sum() + smooth) / ((s * s).sum() + (t * t).sum() + smooth))
    return 0.5 * (terms[0] + terms[1])


def vat_perturbation(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, p: torch.Tensor,
                     xi: float, eps: float, iterations: int = 1) -> torch.Tensor:
    """r_adv = ε·d̂ (per image ‖r_adv‖₂ = ε): d from U(−½, ½), normalised, then `iterations` power iterations
    d ← normalise(∇_d D(σ(f(x + ξd)), p)) with D = `soft_dice_distance` and the detached target `p`. Only d
    receives gradient here (`torch.autograd.grad`): no parameter gradient is accumulated."""
    x = x.detach()
    p = p.detach()
    d = l2_normalize(torch.rand_like(x) - 0.5)
    for _ in range(iterations):
        d.requires_grad_(True)
        dist = soft_dice_distance(torch.sigmoid(logits_fn(x + xi * d).float()), p)
        (grad,) = torch.autograd.grad(dist, d)
        d = l2_normalize(grad.detach())
    return eps * d


def prototype_distance(q: torch.Tensor, labels: torch.Tensor, memory: dict[int, torch.Tensor],
                       n_classes: int = 2) -> torch.Tensor:
    """(1/n_classes)·Σ_c mean_{i: label c} mean_j (1 − cos(q_i, m_j^c)) over the classes c with a memory
    of ≥ 2 vectors and ≥ 2 pixels (their contrastive_class_to_class_learned_memory with uniform weights).
    Computed as 1 − q̂_i·mean_j m̂_j (the same value, without the pixel × memory matrix)."""
    loss = q.sum() * 0.0
    for c, mem in memory.items():
        rows = labels == c
        if mem.shape[0] > 1 and int(rows.sum()) > 1:
            proto = F.normalize(mem.float(), dim=1).mean(dim=0)
            loss = loss + (1.0 - F.normalize(q[rows].float(), dim=1) @ proto).mean()
    return loss / n_classes


class PrototypeMemory(nn.Module):
    """Per class the last `size` projected feature vectors of correctly predicted labeled pixels (their
    FeatureMemory): replaced whenever a batch has such pixels of the class, else kept (saved with the heads)."""

    def __init__(self, n_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(n_classes, size, dim))
        self.register_buffer("count", torch.zeros(n_classes, dtype=torch.long))

    def update(self, c: int, vectors: torch.Tensor) -> None:
        """Store `vectors` [N, dim] for class c: a random `size` of them when there are more."""
        size = self.bank.shape[1]
        if vectors.shape[0] == 0:
            return
        if vectors.shape[0] > size:
            vectors = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[:size]]
        self.bank[c, : vectors.shape[0]] = vectors.detach().to(self.bank.dtype)
        self.count[c] = vectors.shape[0]

    def get(self, c: int) -> torch.Tensor:
        return self.bank[c, : int(self.count[c])]


def _head(dim_in: int, dim: int) -> nn.Sequential:
    """Their projection / prediction head: Linear, BatchNorm1d, ReLU, Linear (on pixel feature vectors)."""
    return nn.Sequential(nn.Linear(dim_in, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def _pixels(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H', W'] (padded) → [B·H·W, C] pixel vectors of the unpadded area."""
    h, w = size
    f = feature_map[..., :h, :w]
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


@register_seg_method("ssnet")
class SSNetMethod(SegMethod):
    """SS-Net (Wu, Wu, Wang, Ge, Cai: "Exploring Smoothness and Class-Separation for Semi-supervised Medical
    Image Segmentation", MICCAI 2022), the 2-D version of their `train_ss_2d.py`, binary.

    Smoothness (VAT, one power iteration): r_adv = ε·normalise(∇_d D(σ(f(x + ξd)), sg(p))), d random unit,
    ξ = 10, ε = 6 (per image L2 norm), D = soft Dice distance (`soft_dice_distance`); L_vat = D(σ(f(x + r_adv)),
    sg(p)). Separation: the decoder's last map (`feats.decoder`, w channels) per pixel goes through a projection
    head P and a prediction head Q (`heads["projection"]`, `heads["prediction"]`); the memory M_c holds up to 32
    vectors P(f) (no gradient, P in eval mode) of labeled pixels predicted correctly as class c (foreground only,
    as their code); every labeled pixel (class = its label) and unlabeled pixel (class = the pseudo-label
    1[p ≥ ½]) is pulled to its class's memory: L_c = ½·Σ_c mean_i mean_j (1 − cos(Q(P(f_i)), m_j^c)).

        L = L_sup(zˡ) + λ(t)·(L_vat + 0.1·(L_cˡ + L_cᵘ))

    Departures (compact but faithful): their learned per-vector "selector" MLPs (which rank the memory
    candidates and re-weight the distances) are left out: uniform weights, a random choice of the 32 memory
    vectors; sigmoid with the two-class Dice (p, 1 − p) instead of their 4-class softmax; L_sup = Dice + BCE
    (their loss adds only the Dice term); VAT and the student see the labeled and unlabeled images in the passes
    `student_forward` says (theirs: one batch), the VAT target is the main pass's detached prediction (theirs:
    a second no-grad pass), and the VAT passes leave BatchNorm running statistics untouched, as theirs.
    `perturb.*` views are not used.
    """

    uses_unlabeled = True
    # train_ss_2d.py (ACDC): consistency 0.1, sigmoid ramp-up over consistency_rampup 200 "epochs" of 150
    # iterations = max_iterations 30000, i.e. the whole run; ξ, ε, 0.1 and the head sizes in `SSNetConfig`.
    preset: ClassVar[dict[str, Any]] = {"semi.consistency_weight": 0.1, "semi.rampup_fraction": 1.0}

    def __init__(self, cfg: SegMethodConfig, student: nn.Module, vlm: nn.Module | None = None) -> None:
        super().__init__(cfg, student, vlm)
        net = student_config(student)
        c = cfg.ssnet
        self.heads["projection"] = _head(net.base_width, c.proj_dim)
        self.heads["prediction"] = _head(c.proj_dim, c.proj_dim)
        self.heads["memory"] = PrototypeMemory(2, c.memory_size, c.proj_dim)
        self.heads.to(self.device)

    @property
    def memory(self) -> PrototypeMemory:
        return self.heads["memory"]  # type: ignore[return-value]

    def _classes(self) -> tuple[int, ...]:
        return (0, 1) if self.cfg.ssnet.background_prototype else (1,)

    def _update_memory(self, vectors: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor) -> None:
        """Memory of each class from the projected (eval mode, no gradient) correctly predicted labeled pixels."""
        proj = self.heads["projection"]
        was = proj.training
        proj.eval()
        try:
            with torch.no_grad():
                for c in self._classes():
                    rows = correct & (labels == c)
                    if bool(rows.any()):
                        self.memory.update(c, proj(vectors[rows].detach()))
        finally:
            proj.train(was)

    def separation(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_c of pixel vectors [N, w] with their classes [N] against the current memory."""
        if vectors.shape[0] < 2:
            return vectors.sum() * 0.0
        q = self.heads["prediction"](self.heads["projection"](vectors))
        memory = {c: self.memory.get(c) for c in self._classes()}
        return prototype_distance(q, labels, memory, n_classes=2)

    def vat_loss(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """L_vat on images x whose clean logits are z (target sg(σ(z))), BatchNorm running statistics frozen."""
        c = self.cfg.ssnet
        p = torch.sigmoid(z.detach().float())
        with self._perturbed_pass():
            r_adv = vat_perturbation(self.student, x, p, c.vat_xi, c.vat_eps, c.vat_iterations)
            return soft_dice_distance(torch.sigmoid(self.student(x + r_adv).float()), p)

    def loss(
        self,
        labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.ssnet
        x_l, y_l, has_l, _ = self._unpack(labeled)
        x_u = self._unpack(unlabeled)[0] if unlabeled is not None else None
        z_l, f_l, z_u, f_u = student_features(self, x_l, x_u)
        l_sup = self._sup_loss(z_l, y_l, has_l)
        lam = consistency_lambda(self.cfg, step, total_steps)
        logs: dict[str, torch.Tensor | float] = {"sup": l_sup, "lambda": lam}
        loss = l_sup
        if z_u is None or f_u is None or x_u is None:
            logs["loss"] = loss
            return loss, self._floats(logs)
        # smoothness
        vat = [self.vat_loss(x_u, z_u)]
        if c.vat_on == "all":
            vat.append(self.vat_loss(x_l, z_l))
        l_vat = torch.stack(vat).mean()
        # separation: labeled pixels with their labels (memory from the correct ones), unlabeled with pseudo-labels
        l_sep_l = z_l.sum() * 0.0
        if y_l is not None and bool(has_l.any()):
            vec_l = _pixels(f_l.decoder[has_l], f_l.size)
            lab_l = (y_l[has_l] >= 0.5).long().permute(0, 2, 3, 1).reshape(-1)
            pred_l = (z_l[has_l].detach() > 0).long().permute(0, 2, 3, 1).reshape(-1)
            self._update_memory(vec_l, lab_l, pred_l == lab_l)
            l_sep_l = self.separation(vec_l, lab_l)
        vec_u = _pixels(f_u.decoder, f_u.size)
        pseudo_u = (z_u.detach() > 0).long().permute(0, 2, 3, 1).reshape(-1)
        l_sep_u = self.separation(vec_u, pseudo_u)
        l_unsup = l_vat + c.separation_weight * (l_sep_l + l_sep_u)
        loss = loss + lam * l_unsup
        logs.update({"vat": l_vat, "sep_l": l_sep_l, "sep_u": l_sep_u, "cons": l_unsup})
        logs["loss"] = loss
        return loss, self._floats(logs)
