"""Unlabeled-view perturbations: hand values, identities and the geometry shared by both views."""

from __future__ import annotations

import pytest
import torch

from dusss.errors import ConfigError
from dusss.methods.perturb import (
    Mix,
    PerturbConfig,
    color_jitter,
    cutmix,
    gaussian_blur,
    pseudo_targets,
    strong_view,
    teacher_view,
)


def test_teacher_noise_is_off_by_default_and_clamped_like_ssl4mis() -> None:
    x = torch.full((2, 3, 8, 8), 0.5)
    assert teacher_view(x, PerturbConfig()) is x
    torch.manual_seed(0)
    y = teacher_view(x, PerturbConfig(teacher_noise=10.0, teacher_noise_clip=0.2))
    assert (y - x).abs().max().item() == pytest.approx(0.2)  # N(0, 10²) saturates at the clamp
    torch.manual_seed(0)
    z = teacher_view(x, PerturbConfig(teacher_noise=0.1))
    assert 0.05 < (z - x).std().item() < 0.15


def test_color_jitter_hand_value_and_probability() -> None:
    x = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 2, 2)
    # contrast 0, brightness 0, gamma 0 -> the identity even when applied
    ident = PerturbConfig(jitter_p=1.0, contrast=0.0, brightness=0.0, gamma=0.0)
    torch.testing.assert_close(color_jitter(x, ident), x)
    # jitter_p = 0: never applied, whatever the ranges
    torch.testing.assert_close(color_jitter(x, PerturbConfig(jitter_p=0.0, contrast=0.9)), x)
    # contrast only: ((x - mean)·c + mean), c drawn in [1 - 0.5, 1.5]; mean 0.5 is preserved
    torch.manual_seed(3)
    y = color_jitter(x, PerturbConfig(jitter_p=1.0, contrast=0.5, brightness=0.0, gamma=0.0))
    c = (y[0, 0, 1, 1] - 0.5) / 0.3
    assert 0.5 <= c.item() <= 1.5 and y.mean().item() == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(y.flatten(), 0.5 + (x.flatten() - 0.5) * c)


def test_blur_keeps_constants_and_mass_and_smooths_a_spike() -> None:
    cfg = PerturbConfig(blur_p=1.0, blur_sigma=(1.0, 1.0))
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, cfg), flat)
    spike = torch.zeros(1, 1, 16, 16)
    spike[0, 0, 8, 8] = 1.0
    out = gaussian_blur(spike, cfg)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # far from the border: no mass lost
    assert out[0, 0, 8, 8].item() == pytest.approx(1 / (2 * torch.pi * 1.0), rel=0.05)  # 2-D Gaussian peak
    assert out[0, 0, 8, 9].item() < out[0, 0, 8, 8].item()
    torch.testing.assert_close(gaussian_blur(spike, PerturbConfig(blur_p=0.0)), spike)


def test_mix_applies_the_same_boxes_to_images_and_targets() -> None:
    box = torch.zeros(2, 1, 2, 2)
    box[0, 0, 0, 0] = 1  # image 0 takes its top-left pixel from image 1
    mix = Mix(box=box, perm=torch.tensor([1, 0]))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[10.0, 20.0], [30.0, 40.0]]]])
    torch.testing.assert_close(mix.apply(x), torch.tensor([[[[10.0, 2.0], [3.0, 4.0]]], [[[10.0, 20.0], [30.0, 40.0]]]]))


def test_cutmix_boxes_follow_the_config() -> None:
    x = torch.rand(4, 3, 32, 32)
    assert cutmix(x, PerturbConfig(cutmix_p=0.0)) is None
    assert cutmix(x[:1], PerturbConfig(cutmix_p=1.0)) is None  # no partner in a batch of one
    torch.manual_seed(0)
    mix = cutmix(x, PerturbConfig(cutmix_p=1.0, cutmix_area=(0.25, 0.25)))
    assert mix is not None
    areas = mix.box.flatten(1).sum(1) / (32 * 32)
    assert torch.all((areas > 0.15) & (areas < 0.35))  # rounding of the box sides
    assert mix.perm.tolist() == [1, 2, 3, 0]


def test_strong_view_is_the_weak_view_when_off_and_photometric_only_when_on() -> None:
    x = 0.3 + 0.4 * torch.rand(3, 3, 16, 16)  # far enough from 0 and 1 that no pixel is clamped
    same, mix = strong_view(x, PerturbConfig())
    assert same is x and mix is None
    torch.manual_seed(1)
    y, mix = strong_view(x, PerturbConfig(strong=True, cutmix_p=0.0, jitter_p=1.0, blur_p=0.0, gamma=0.0,
                                          brightness=0.0))
    assert mix is None
    # contrast about the image mean is affine per image: no pixel moves (the geometry is shared)
    for i in range(3):
        a, b = x[i].flatten() - x[i].mean(), y[i].flatten() - y[i].mean()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1].item() == pytest.approx(1.0, abs=1e-4)


def test_pseudo_targets_soft_and_hard_with_confidence() -> None:
    z = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    soft, w = pseudo_targets(z, PerturbConfig())
    torch.testing.assert_close(soft, torch.sigmoid(z))
    assert w is None
    hard, w = pseudo_targets(z, PerturbConfig(pseudo_label="hard", confidence=0.9))
    torch.testing.assert_close(hard, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    # σ(3) = 0.953 >= 0.9; σ(0.5) = 0.62 < 0.9
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("bad", [{"cutmix_p": 1.5}, {"contrast": 1.0}, {"pseudo_label": "argmax"},
                                 {"confidence": 0.3}, {"blur_sigma": (2.0, 1.0)}, {"feature_dropout": 1.0}])
def test_bad_perturb_config_is_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        PerturbConfig(**bad)
