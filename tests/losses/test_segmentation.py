"""Step-2 losses (eqs 15-18) on hand-derived values; the merge is on logits (guard against METHOD S3)."""

from __future__ import annotations

import math

import pytest
import torch

from dusss.losses.segmentation import (
    consistency_loss,
    dice_loss,
    merge_logits,
    seg_loss,
    semi_loss,
    soft_bce,
)

LN3 = math.log(3.0)


def _logits_2x2() -> torch.Tensor:
    # σ → [[0.5, 0.75], [0.25, 0.5]]
    return torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]]])


def _target_2x2() -> torch.Tensor:
    return torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])


def test_dice_loss_hand_value() -> None:
    # Σpt = 0.5 + 0.75 = 1.25, Σp = 2, Σt = 2, smooth 1: 1 − (2.5 + 1)/(4 + 1) = 0.3
    assert dice_loss(_logits_2x2(), _target_2x2()).item() == pytest.approx(0.3, abs=1e-6)


def test_dice_loss_empty_target_and_empty_prediction_is_zero() -> None:
    logits = torch.full((1, 1, 2, 2), -30.0)
    assert dice_loss(logits, torch.zeros(1, 1, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_bce_hand_values() -> None:
    # −[ln 0.5 + ln 0.75 + ln 0.75 + ln 0.5]/4 = ln(8/3)/2
    assert soft_bce(_logits_2x2(), _target_2x2()).item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-6)
    # soft target 0.5 against logit 0: ln 2 per pixel
    assert soft_bce(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)).item() == pytest.approx(math.log(2))
    # soft target 0.25 against p = 0.75: −0.25 ln 0.75 − 0.75 ln 0.25
    expected = -0.25 * math.log(0.75) - 0.75 * math.log(0.25)
    got = soft_bce(torch.full((1, 1, 2, 2), LN3), torch.full((1, 1, 2, 2), 0.25)).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_seg_loss_kinds_and_reduction() -> None:
    dice, bce = 0.3, math.log(8 / 3) / 2
    assert seg_loss(_logits_2x2(), _target_2x2()).item() == pytest.approx(0.5 * dice + 0.5 * bce, abs=1e-6)
    assert seg_loss(_logits_2x2(), _target_2x2(), kind="bce").item() == pytest.approx(bce, abs=1e-6)
    logits = torch.cat([_logits_2x2(), torch.zeros(1, 1, 2, 2)])
    target = torch.cat([_target_2x2(), torch.full((1, 1, 2, 2), 0.5)])
    per_image = soft_bce(logits, target, reduction="none")
    assert per_image.shape == (2,)
    assert per_image[1].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        seg_loss(_logits_2x2(), _target_2x2(), kind="ce")
    with pytest.raises(ValueError):
        soft_bce(_logits_2x2(), torch.zeros(1, 1, 4, 4))


def test_merge_is_on_logits_and_can_go_below_half() -> None:
    teacher = torch.tensor([-3.0, 2.0, -1.0])
    text = torch.tensor([-2.0, 1.0, 3.0])
    merged = merge_logits(teacher, text)
    torch.testing.assert_close(merged, torch.tensor([-5.0, 3.0, 2.0]))
    q = torch.sigmoid(merged)
    assert q[0].item() == pytest.approx(1 / (1 + math.exp(5)))
    assert q[0].item() < 0.5  # both experts say background → background (S3 guard)
    # the released code's probability-space merge is >= 0.5 everywhere
    q_code = torch.sigmoid(merge_logits(teacher, text, mode="prob"))
    assert (q_code >= 0.5).all() and (q_code <= 1 / (1 + math.exp(-2)) + 1e-6).all()


def test_semi_loss_hand_value_and_detached_targets() -> None:
    # student p = 0.75; teacher z_t = ln3, text z_text = −ln3 → q_merged = σ(0) = 0.5, q_text = 0.25
    student = torch.full((1, 1, 2, 2), LN3, requires_grad=True)
    teacher = torch.full((1, 1, 2, 2), LN3, requires_grad=True)
    text = torch.full((1, 1, 2, 2), -LN3, requires_grad=True)
    l_merged = -0.5 * math.log(0.75) - 0.5 * math.log(0.25)
    l_text = -0.25 * math.log(0.75) - 0.75 * math.log(0.25)
    loss, parts = semi_loss(student, teacher, text, kind="bce")
    assert loss.item() == pytest.approx(0.5 * (l_merged + l_text), abs=1e-6)
    assert parts["merged"].item() == pytest.approx(l_merged, abs=1e-6)
    assert parts["text"].item() == pytest.approx(l_text, abs=1e-6)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and text.grad is None
    only_merged, parts = semi_loss(student, teacher, text, kind="bce", use_text_term=False)
    assert only_merged.item() == pytest.approx(l_merged, abs=1e-6)
    assert "text" not in parts


def test_semi_loss_hard_confident_targets_by_hand() -> None:
    """`hard_confidence` τ: targets 1[q ≥ 0.5] where max(q, 1 − q) ≥ τ, the rest ignored; BCE over all pixels."""
    student = torch.full((1, 1, 1, 4), LN3)  # p = 0.75 everywhere
    teacher = torch.tensor([[[[4.0, -4.0, 0.2, -0.2]]]])  # q = 0.982, 0.018 (confident), 0.55, 0.45 (not)
    text = torch.zeros_like(teacher)  # z_text = 0: merged = teacher, q_text = 0.5 (never confident at τ 0.9)
    loss, parts = semi_loss(student, teacher, text, kind="bce", hard_confidence=0.9)
    l_merged = (-math.log(0.75) - math.log(0.25)) / 4  # target 1 on pixel 0, 0 on pixel 1, pixels 2-3 ignored
    assert parts["merged"].item() == pytest.approx(l_merged, abs=1e-6)
    assert parts["text"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(0.5 * l_merged, abs=1e-6)
    # the mask follows CutMix: swapping the two halves moves pixel 0's target and weight with it
    swap = lambda x: x.flip(-1)
    _, parts = semi_loss(student, teacher, text, kind="bce", hard_confidence=0.9, target_transform=swap,
                         use_text_term=False)
    assert parts["merged"].item() == pytest.approx(l_merged, abs=1e-6)
    # after the flip: weights [0, 0, 1, 1], targets [·, ·, 0, 1]; with p = 0.75, 0.75, 0.75, 0.25 both kept
    # pixels cost −ln 0.25 (unflipped weights would keep pixels 0-1 instead: (−ln 0.75 − ln 0.25) / 4)
    student2 = torch.tensor([[[[LN3, LN3, LN3, -LN3]]]])
    _, parts = semi_loss(student2, teacher, text, kind="bce", hard_confidence=0.9, target_transform=swap,
                         use_text_term=False)
    assert parts["merged"].item() == pytest.approx(-math.log(0.25) / 2, abs=1e-6)


def test_consistency_loss_values() -> None:
    student = torch.full((1, 1, 2, 2), LN3)  # p = 0.75
    teacher = torch.full((1, 1, 2, 2), 0.25)  # target probability q = 0.25
    bce = -0.25 * math.log(0.75) - 0.75 * math.log(0.25)
    assert consistency_loss(student, teacher).item() == pytest.approx(bce, abs=1e-6)
    assert consistency_loss(student, teacher, kind="mse").item() == pytest.approx(0.25, abs=1e-6)


def test_pixel_weight_masks_each_loss_by_hand() -> None:
    """Confidence-masked losses: Σ w·ℓ / all pixels for BCE and MSE, Dice over the weighted pixels only."""
    student = torch.tensor([[[[LN3, -LN3], [LN3, 0.0]]]])  # p = 0.75, 0.25, 0.75, 0.5
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    weight = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # the two bottom pixels are ignored
    # BCE of the two kept pixels: -ln 0.75 each; divided by all 4 pixels
    assert consistency_loss(student, target, "bce", weight=weight).item() == pytest.approx(
        2 * -math.log(0.75) / 4, abs=1e-6)
    # MSE: (0.25² + 0.25²) / 4
    assert consistency_loss(student, target, "mse", weight=weight).item() == pytest.approx(0.125 / 4, abs=1e-6)
    # Dice over kept pixels: inter = 0.75, Σp = 1.0, Σt = 1 -> 1 - (1.5 + 1)/(2 + 1)
    assert dice_loss(student, target, weight=weight).item() == pytest.approx(1 - 2.5 / 3, abs=1e-6)
    # unweighted Dice differs (the ignored pixels count): inter = 0.75 + 0.5, Σp = 2.25, Σt = 2
    assert dice_loss(student, target).item() == pytest.approx(1 - (2 * 1.25 + 1) / 5.25, abs=1e-6)
    with pytest.raises(ValueError, match="pixel weight"):
        soft_bce(student, target, weight=weight[..., :1])


# -- killing the surviving mutants of tools/mutation.py (docs/mutation.md) -------------------------------------
# Two 1×1×2 images at logit 0 (σ = 0.5, BCE = ln 2 per pixel whatever the target): truth [1, 1] and [0, 0].
Z2 = torch.zeros(2, 1, 1, 2)
T2 = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(2, 1, 1, 2)
LN2 = math.log(2.0)


def test_seg_loss_passes_reduction_and_weight_to_both_terms() -> None:
    # Dice (s = 1): image 1 (2·1 + 1)/(1 + 2 + 1) = 3/4 → 0.25; image 2 1/(1 + 0 + 1) → 0.5
    torch.testing.assert_close(dice_loss(Z2, T2, reduction="none"), torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(seg_loss(Z2, T2, reduction="none"), torch.tensor([0.125 + LN2 / 2, 0.25 + LN2 / 2]))
    torch.testing.assert_close(seg_loss(Z2, T2, "bce", reduction="none"), torch.tensor([LN2, LN2]))
    w = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(2, 1, 1, 2)  # drop the second pixel of image 1
    # weighted Dice: image 1 (2·0.5 + 1)/(0.5 + 1 + 1) = 0.8 → 0.2; BCE: image 1 ln2/2, image 2 ln2
    torch.testing.assert_close(seg_loss(Z2, T2, reduction="none", weight=w),
                               torch.tensor([0.1 + LN2 / 4, 0.25 + LN2 / 2]))
    torch.testing.assert_close(seg_loss(Z2, T2, "bce", reduction="none", weight=w), torch.tensor([LN2 / 2, LN2]))


def test_consistency_loss_per_image_reduction() -> None:
    torch.testing.assert_close(consistency_loss(Z2, T2, reduction="none"), torch.tensor([LN2, LN2]))
    soft = torch.tensor([1.0, 1.0, 0.5, 0.0]).reshape(2, 1, 1, 2)
    # MSE of σ(0) = 0.5: image 1 (0.25 + 0.25)/2, image 2 (0 + 0.25)/2
    torch.testing.assert_close(consistency_loss(Z2, soft, "mse", reduction="none"), torch.tensor([0.25, 0.125]))


def test_semi_loss_defaults_merge_mode_transform_and_reduction() -> None:
    z_s = torch.ones(1, 1, 1, 1)  # BCE(z = 1, q) = ln(1 + e) − q
    zero = torch.zeros(1, 1, 1, 1)
    sp1 = math.log1p(math.e)
    loss, parts = semi_loss(z_s, zero, zero)  # default kind is BCE: targets σ(0 + 0) = σ(0) = 0.5
    assert loss.item() == pytest.approx(sp1 - 0.5)
    assert parts["semi"].item() == pytest.approx(sp1 - 0.5)
    s1 = 1 / (1 + math.exp(-1.0))
    loss, _ = semi_loss(z_s, zero, zero, merge="prob")  # q_merged = σ(σ(0) + σ(0)) = σ(1)
    assert loss.item() == pytest.approx(0.5 * ((sp1 - s1) + (sp1 - 0.5)))
    loss, _ = semi_loss(z_s, zero + 2.0, zero, target_transform=lambda q: 1.0 - q)  # σ(2) → σ(−2), 0.5 → 0.5
    assert loss.item() == pytest.approx(0.5 * ((sp1 - 1 / (1 + math.exp(2.0))) + (sp1 - 0.5)))
    per_image, parts = semi_loss(Z2, Z2, Z2, reduction="none")
    torch.testing.assert_close(per_image, torch.tensor([LN2, LN2]))
    torch.testing.assert_close(parts["text"], torch.tensor([LN2, LN2]))
