"""`engine.train.pseudo_label_dice`: Dice and foreground ratio of each pseudo-label against hidden masks."""

from __future__ import annotations

import pytest
import torch

from dusss.engine.train import pseudo_label_dice


class _FixedLabels:
    """A method whose pseudo-labels are fixed logits per image (the image's first pixel names the row)."""

    def __init__(self, labels: dict[str, torch.Tensor]) -> None:
        self.labels = labels

    def pseudo_labels(self, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = images[:, 0, 0, 0].long()
        return {name: z[rows] for name, z in self.labels.items()}


def _logits(mask: torch.Tensor) -> torch.Tensor:
    return (mask.float() * 2 - 1) * 10  # σ = 1 inside, 0 outside


def test_dice_and_foreground_ratio_by_hand() -> None:
    y = torch.zeros(2, 1, 4, 4)
    y[0, 0, :2, :2] = 1  # 4 lesion pixels
    y[1, 0, 0, 0] = 1  # 1 lesion pixel
    teacher = torch.zeros(2, 1, 4, 4)
    teacher[0, 0, :2, :] = 1  # 8 pixels, 4 of them right: Dice 2·4/(8 + 4) = 2/3
    teacher[1, 0, 0, :2] = 1  # 2 pixels, 1 right: Dice 2/3
    text = torch.zeros(2, 1, 4, 4)  # empty: Dice 0 on both lesion images
    images = torch.arange(2).float().view(2, 1, 1, 1).expand(2, 3, 4, 4)
    batch = {"image": images, "mask": y, "text": ["a", "b"], "key": ["k0", "k1"]}
    method = _FixedLabels({"teacher": _logits(teacher), "text": _logits(text)})
    out = pseudo_label_dice(method, [batch], torch.device("cpu"))
    assert out["pseudo/teacher_dice"] == pytest.approx(2 / 3)
    assert out["pseudo/text_dice"] == pytest.approx(0.0)
    assert out["pseudo/teacher_fg_ratio"] == pytest.approx(10 / 5)  # 8 + 2 predicted over 4 + 1 true
    assert out["pseudo/text_fg_ratio"] == pytest.approx(0.0)


def test_no_foreground_ratio_without_true_foreground() -> None:
    y = torch.zeros(1, 1, 4, 4)
    batch = {"image": torch.zeros(1, 3, 4, 4), "mask": y, "text": ["a"], "key": ["k0"]}
    out = pseudo_label_dice(_FixedLabels({"teacher": _logits(y)}), [batch], torch.device("cpu"))
    assert "pseudo/teacher_fg_ratio" not in out
