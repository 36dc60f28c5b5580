"""SS-Net (`ssnet`): the VAT direction (norm ε per image, the power-iteration gradient, no parameter gradient
left behind), the soft Dice distance and the prototype term by hand, the memory from correctly predicted
foreground pixels, gradient routing, state round trip, registry and preset."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dusss.engine.train import load_train_config
from dusss.methods.baseline_config import SSNetConfig
from dusss.methods.baselines.ssnet import (
    SSNetMethod,
    prototype_distance,
    soft_dice_distance,
    vat_perturbation,
)
from dusss.methods.segmentation import SegMethodConfig, build_seg_method
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import square_lesion_batch

S = 32


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


_batch = functools.partial(square_lesion_batch, size=S)


def _build(**ss) -> SSNetMethod:
    torch.manual_seed(0)
    cfg = SegMethodConfig(consistency_weight=1.0, rampup_fraction=0.0, ssnet=SSNetConfig(**ss))
    method = build_seg_method("ssnet", cfg, UNet(UNetConfig(base_width=8)))
    assert isinstance(method, SSNetMethod)
    with torch.no_grad():
        for p in method.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method.train()


def _dice2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Two-class soft Dice distance written out (independent of the module's)."""
    fg = 1 - 2 * (s * t).sum() / ((s**2).sum() + (t**2).sum())
    bg = 1 - 2 * ((1 - s) * (1 - t)).sum() / (((1 - s) ** 2).sum() + ((1 - t) ** 2).sum())
    return (fg + bg) / 2


def test_soft_dice_distance_by_hand() -> None:
    p_hat, p = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])
    fg = 1 - 1.6 / (0.64 + 0.09 + 1.0)
    bg = 1 - 1.4 / (0.04 + 0.49 + 1.0)
    assert float(soft_dice_distance(p_hat, p)) == pytest.approx((fg + bg) / 2, rel=1e-6)
    assert float(soft_dice_distance(p, p)) == pytest.approx(0.0, abs=1e-6)


def test_vat_direction_has_norm_eps_and_follows_the_power_iteration() -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 6, 6)
    w = torch.tensor(3.0, requires_grad=True)

    def logits_fn(v: torch.Tensor) -> torch.Tensor:  # depends on channel 0 only
        return w * (v[:, :1] - 0.5)

    p = torch.sigmoid(logits_fn(x)).detach().roll(1, dims=-1)  # a target the clean prediction does not match
    torch.manual_seed(7)
    r = vat_perturbation(logits_fn, x, p, xi=10.0, eps=6.0)
    norms = r.flatten(1).norm(dim=1)
    assert norms.tolist() == pytest.approx([6.0, 6.0], rel=1e-5)
    assert float(r[:, 1:].abs().max()) == 0.0  # no gradient through the channels the network ignores
    assert w.grad is None  # only d was differentiated
    # by hand: the same random start, one power iteration with the written-out distance
    torch.manual_seed(7)
    d = torch.rand_like(x) - 0.5
    d = (d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).requires_grad_(True)
    (g,) = torch.autograd.grad(_dice2(torch.sigmoid(logits_fn(x + 10.0 * d)), p), d)
    expected = 6.0 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(r, expected, atol=1e-5)


def test_vat_leaves_no_parameter_gradient_on_the_student() -> None:
    method = _build()
    x = _batch(2, 2, False)["image"]
    with torch.no_grad():
        z = method.student(x)
    vat_perturbation(method.student, x, torch.sigmoid(z), 10.0, 6.0)
    assert all(p.grad is None for p in method.student.parameters())


def test_prototype_term_by_hand_on_a_two_pixel_map() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the 2 pixels of a 1×2 feature map, both labelled 1
    mem = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    # cos: (q1, m1) = 1/√2, (q1, m2) = 1, (q2, m1) = 1/√2, (q2, m2) = 0; mean of 1 − cos over the 4 pairs, / 2 classes
    by_hand = ((1 - 1 / math.sqrt(2)) * 2 + 0.0 + 1.0) / 4 / 2
    labels = torch.tensor([1, 1])
    assert float(prototype_distance(q, labels, {1: mem})) == pytest.approx(by_hand, rel=1e-6)
    # a class with a single pixel (or a single memory vector) does not count, as in their code
    assert float(prototype_distance(q, torch.tensor([1, 0]), {1: mem})) == 0.0
    assert float(prototype_distance(q, labels, {1: mem[:1]})) == 0.0
    # the roles of queries and memory are not interchangeable
    q3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    forward = prototype_distance(q3, torch.tensor([1, 1, 0]), {1: mem})
    swapped = prototype_distance(mem, torch.tensor([1, 1]), {1: q3})
    assert float(forward) != pytest.approx(float(swapped), rel=1e-3)


def test_memory_holds_projected_correct_foreground_pixels_only() -> None:
    method = _build()
    torch.manual_seed(3)
    vectors = torch.randn(5, 8)
    labels = torch.tensor([1, 1, 0, 1, 0])
    correct = torch.tensor([True, False, True, True, True])
    method._update_memory(vectors, labels, correct)
    proj = method.heads["projection"]
    assert proj.training  # restored
    proj.eval()
    with torch.no_grad():
        expected = proj(vectors[[0, 3]])
    assert int(method.memory.count[1]) == 2 and int(method.memory.count[0]) == 0
    assert torch.allclose(method.memory.get(1), expected, atol=1e-6)
    # a batch without such pixels keeps the last memory
    method._update_memory(vectors, labels, torch.zeros(5, dtype=torch.bool))
    assert torch.allclose(method.memory.get(1), expected, atol=1e-6)


def test_gradients_reach_the_student_and_the_heads_not_the_memory() -> None:
    method = _build()
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False))
    assert logs["vat"] > 0 and logs["sep_l"] > 0 and logs["sep_u"] > 0
    assert logs["cons"] == pytest.approx(logs["vat"] + 0.1 * (logs["sep_l"] + logs["sep_u"]), rel=1e-5)
    loss.backward()
    for name in ("projection", "prediction"):
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in method.heads[name].parameters()
                   if p.ndim > 1), name
    assert method.student.up1.conv[0][0].weight.grad is not None
    assert not method.memory.bank.requires_grad and int(method.memory.count[1]) > 0


def test_separation_and_vat_alone_reach_the_student() -> None:
    method = _build()
    loss, logs = method.loss(_batch(2, 1, False), _batch(2, 2, False))  # no masks: L_sup = 0, no labeled L_c
    assert logs["sup"] == 0.0 and logs["sep_l"] == 0.0
    loss.backward()
    assert float(method.student.inc[0].weight.grad.abs().sum()) > 0


def test_state_round_trip_into_a_fresh_instance() -> None:
    a = _build()
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)
    a.loss(labeled, unlabeled)  # fills the memory
    torch.manual_seed(5)
    b = build_seg_method("ssnet", a.cfg, UNet(UNetConfig(base_width=8))).train()
    b.student.load_state_dict(a.student.state_dict())
    state = a.state_dict()
    assert {"heads.memory.bank", "heads.memory.count"} <= set(state)
    torch.manual_seed(7)
    before = b.loss(labeled, unlabeled)[1]["loss"]
    b.load_state_dict(state)
    torch.manual_seed(7)
    ref = a.loss(labeled, unlabeled)[1]["loss"]
    torch.manual_seed(7)
    after = b.loss(labeled, unlabeled)[1]["loss"]
    assert after == pytest.approx(ref, rel=1e-6) and before != pytest.approx(ref, rel=1e-6)


def test_registry_and_preset() -> None:
    method = build_seg_method("ssnet", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    assert isinstance(method, SSNetMethod) and method.uses_unlabeled
    cfg = load_train_config(None, {"method": "ssnet", "data": "x", "out": "y"})
    assert cfg.semi.consistency_weight == 0.1 and cfg.semi.rampup_fraction == 1.0
    assert (cfg.semi.ssnet.vat_xi, cfg.semi.ssnet.vat_eps, cfg.semi.ssnet.separation_weight) == (10.0, 6.0, 0.1)
