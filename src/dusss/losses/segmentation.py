"""Step-2 segmentation losses (paper eqs 15-18), written on logits (METHOD §3.7, "Recommendation").

* `dice_loss`: soft Dice per image, `1 − (2Σpt + s)/(Σp + Σt + s)` with p = σ(logits), linear (not squared)
  denominators and smooth s = 1 (so an empty target with a near-empty prediction costs little).
* `soft_bce`: binary cross-entropy with logits against soft targets in [0, 1], mean over pixels per image.
* `seg_loss`: ℓ of eqs 15-17; `"dice_bce"` = 0.5·Dice + 0.5·BCE (default, the authors' 0.5/0.5 mix) or `"bce"`.
* `merge_logits`: eq 16's merged pseudo-label on logits, z_t + z_text, so that σ(z_t + z_text) is the product
  of the two experts and can go below 0.5 (METHOD §7.2 S3). `mode="prob"` reproduces the released code's
  probability-space merge σ(σ(z_t) + σ(z_text)), which is ≥ 0.5 everywhere, for ablations only.
* `semi_loss`: L_semi = ½(L_semi^merged + L_semi^text) (eqs 16-18) with detached targets.
* `consistency_loss`: consistency of the student to a detached teacher target (soft or hard, optionally
  confidence-masked): the `mt` and `unimatch` unlabeled terms.

Every per-image loss accepts `reduction="none"` (returns `[B]`) so that callers can mask images.
All losses compute in float32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SEG_LOSS_KINDS = ("dice_bce", "bce")
MERGE_MODES = ("logit", "prob")
CONSISTENCY_KINDS = ("bce", "mse", "dice_bce")


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")


def _pixel_weight(weight: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    if weight.shape != target.shape:
        raise ValueError(f"pixel weight {tuple(weight.shape)} and target {tuple(target.shape)} differ in shape")
    return weight.detach().float().flatten(1)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1.0,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice loss per image: 1 − (2Σ σ(z)·t + s)/(Σ σ(z) + Σ t + s), s = `smooth` = 1; mean over images.

    `target` may be soft (in [0, 1]). Sums run over every non-batch dimension. `weight` (same shape, in
    [0, 1]) restricts the sums to the weighted pixels (Dice with an ignore mask: Σ w·σ(z)·t, Σ w·σ(z), Σ w·t).
    """
    _check_shapes(logits, target)
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    w = _pixel_weight(weight, target)
    if w is not None:
        p, t = p * w, t * w
    inter = (p * t).sum(1)
    dice = (2.0 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return _reduce(1.0 - dice, reduction)


def soft_bce(
    logits: torch.Tensor, target_prob: torch.Tensor, reduction: str = "mean", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy of σ(logits) against soft targets in [0, 1] (ℓ_ce of eqs 15-17), mean per image.

    With a pixel `weight`, Σ w·bce / (number of pixels): ignored pixels count as zero loss (UniMatch's masked
    cross-entropy), so the loss shrinks as the confident share shrinks.
    """
    _check_shapes(logits, target_prob)
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target_prob.float(), reduction="none").flatten(1)
    w = _pixel_weight(weight, target_prob)
    if w is not None:
        per_pixel = per_pixel * w
    return _reduce(per_pixel.mean(1), reduction)


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "dice_bce",
    reduction: str = "mean",
    dice_weight: float = 0.5,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ of eqs 15-17: `"dice_bce"` = dice_weight·Dice + (1 − dice_weight)·BCE (0.5/0.5), or `"bce"`.

    `weight`: optional pixel weights (confidence mask) passed to both terms."""
    if kind == "bce":
        return soft_bce(logits, target, reduction, weight=weight)
    if kind == "dice_bce":
        return dice_weight * dice_loss(logits, target, reduction=reduction, weight=weight) + (
            1.0 - dice_weight
        ) * soft_bce(logits, target, reduction, weight=weight)
    raise ValueError(f"seg loss kind must be one of {list(SEG_LOSS_KINDS)}, got {kind!r}")


def merge_logits(teacher_logits: torch.Tensor, text_logits: torch.Tensor, mode: str = "logit") -> torch.Tensor:
    """Logits of eq 16's merged pseudo-label: z_t + z_text, so that q = σ(z_t + z_text).

    `mode="prob"` (repro of the released code, METHOD §7.2 S3) returns σ(z_t) + σ(z_text) instead, so that
    σ(merged) = σ(p_t + p_text) ∈ [0.5, 0.881]: a near-constant target, for ablations only.
    """
    if teacher_logits.shape != text_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and text logits {tuple(text_logits.shape)} differ"
        )
    if mode == "logit":
        return teacher_logits + text_logits
    if mode == "prob":
        return torch.sigmoid(teacher_logits) + torch.sigmoid(text_logits)
    raise ValueError(f"merge mode must be one of {list(MERGE_MODES)}, got {mode!r}")


def confident_hard_targets(prob: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch / UniMatch targets from a probability map: (1[p ≥ 0.5], pixel weight 1[max(p, 1 − p) ≥ τ])."""
    return (prob >= 0.5).float(), (torch.maximum(prob, 1 - prob) >= confidence).float()


def semi_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    text_logits: torch.Tensor,
    kind: str = "bce",
    use_text_term: bool = True,
    merge: str = "logit",
    reduction: str = "mean",
    target_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hard_confidence: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_semi of eqs 16-18 on the unlabeled student logits z_s; targets are detached.

    L_merged = ℓ(z_s, σ(z_t + z_text)) (eq 16), L_text = ℓ(z_s, σ(z_text)) (eq 17),
    L_semi = ½(L_merged + L_text) (eq 18), or L_merged alone when `use_text_term` is False.
    `target_transform` maps both target probability maps (e.g. CutMix with the student's boxes).
    `hard_confidence` τ (FixMatch / UniMatch targets; None = the paper's soft ones): each target q becomes
    1[q ≥ 0.5] on the pixels where max(q, 1 − q) ≥ τ, the others ignored (pixel weight 0, `seg_loss`).
    Returns (L_semi, parts) with detached parts `merged`, `text` (when used) and `semi`.
    """
    teacher_logits = teacher_logits.detach().float()
    text_logits = text_logits.detach().float()
    q_merged = torch.sigmoid(merge_logits(teacher_logits, text_logits, merge))
    q_text = torch.sigmoid(text_logits)
    w_merged = w_text = None
    if hard_confidence is not None:
        (q_merged, w_merged), (q_text, w_text) = (confident_hard_targets(q, hard_confidence) for q in (q_merged, q_text))
    if target_transform is not None:  # e.g. the CutMix of the student's strong view, applied to the targets
        q_merged, q_text = target_transform(q_merged), target_transform(q_text)
        if w_merged is not None and w_text is not None:
            w_merged, w_text = target_transform(w_merged), target_transform(w_text)
    l_merged = seg_loss(student_logits, q_merged, kind, reduction, weight=w_merged)
    parts: dict[str, torch.Tensor] = {"merged": l_merged.detach()}
    if use_text_term:
        l_text = seg_loss(student_logits, q_text, kind, reduction, weight=w_text)
        parts["text"] = l_text.detach()
        l_semi = 0.5 * (l_merged + l_text)
    else:
        l_semi = l_merged
    parts["semi"] = l_semi.detach()
    return l_semi, parts


def consistency_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "bce",
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consistency of the student's logits to a detached target probability map (soft σ(z_t) or hard 0/1).

    `bce`: BCE(z_s, target); `mse`: (σ(z_s) − target)² (Mean Teacher); `dice_bce`: ½Dice + ½BCE. Pixel
    `weight` (confidence mask): Σ w·ℓ / (number of pixels), Dice over the weighted pixels.
    """
    target = target.detach().float()
    if kind in SEG_LOSS_KINDS:
        return seg_loss(student_logits, target, kind, reduction, weight=weight)
    if kind == "mse":
        _check_shapes(student_logits, target)
        per_pixel = ((torch.sigmoid(student_logits.float()) - target) ** 2).flatten(1)
        w = _pixel_weight(weight, target)
        if w is not None:
            per_pixel = per_pixel * w
        return _reduce(per_pixel.mean(1), reduction)
    raise ValueError(f"consistency kind must be one of {list(CONSISTENCY_KINDS)}, got {kind!r}")
