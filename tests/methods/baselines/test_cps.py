"""CPS (`cps`): cross pseudo supervision by hand with two affine nets, gradient routing between the two networks,
the second network's initialisation, pseudo-labels, the state round trip and the preset."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from dusss.errors import CheckpointError
from dusss.losses.segmentation import seg_loss
from dusss.methods.segmentation import SEG_METHODS, SegMethodConfig, build_seg_method, consistency_lambda
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import square_lesion_batch

S = 32


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


_batch = functools.partial(square_lesion_batch, size=S)


def _build(**cfg):
    torch.manual_seed(0)
    student = UNet(UNetConfig(base_width=8))
    return build_seg_method("cps", SegMethodConfig(**cfg), student), student


class Affine(nn.Module):
    """z = a·x[:, :1] + b: a 'network' whose logits are known in closed form."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return self.a * x[:, :1] + self.b


def _bce_by_hand(z: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over all pixels of −[y·log σ(z) + (1 − y)·log(1 − σ(z))] in plain floats."""
    total = 0.0
    zs, ys = z.flatten().tolist(), y.flatten().tolist()
    for zi, yi in zip(zs, ys):
        p = 1.0 / (1.0 + math.exp(-zi))
        total -= yi * math.log(p) + (1 - yi) * math.log(1 - p)
    return total / len(zs)


def _affine_method(**cfg):
    method, _ = _build(consistency_weight=1.0, rampup_fraction=0.0, **cfg)
    method.student = Affine(2.0, -1.0)  # z1 = 2x − 1: label 1[x ≥ 0.5]
    method.heads["net2"] = Affine(-3.0, 1.8)  # z2 = 1.8 − 3x: label 1[x ≤ 0.6]
    return method


def test_registered_and_built_with_a_differently_initialised_second_network() -> None:
    assert SEG_METHODS["cps"].uses_unlabeled
    method, student = _build()
    net2 = method.heads["net2"]
    assert isinstance(net2, UNet) and net2.cfg == student.cfg and net2 is not student
    assert not torch.equal(net2.inc[0].weight, student.inc[0].weight)
    params = {id(p) for p in method.parameters()}
    assert {id(p) for p in net2.parameters()} <= params and {id(p) for p in student.parameters()} <= params
    again, _ = _build()  # the same seed gives the same second network (drawn from torch's RNG)
    torch.testing.assert_close(again.heads["net2"].inc[0].weight, net2.inc[0].weight)
    # one draw from the global stream: building the second network does not consume the run's randomness
    torch.manual_seed(0)
    UNet(UNetConfig(base_width=8))
    torch.randint(0, 2**62, (), dtype=torch.int64)
    expected_next = torch.rand(())
    _build()
    assert torch.equal(torch.rand(()), expected_next)


def test_cross_pseudo_supervision_by_hand() -> None:
    lab, unl = _batch(2, 1, True, size=4), _batch(3, 2, False, size=4)
    method = _affine_method()
    loss, logs = method.loss(lab, unl, step=3, total_steps=10)
    x_l, x_u, y = lab["image"][:, :1], unl["image"][:, :1], lab["mask"]
    z1_l, z2_l, z1_u, z2_u = 2 * x_l - 1, 1.8 - 3 * x_l, 2 * x_u - 1, 1.8 - 3 * x_u
    y1_u, y2_u = (x_u >= 0.5).float(), (x_u <= 0.6).float()
    y1_l, y2_l = (x_l >= 0.5).float(), (x_l <= 0.6).float()
    cps_u = _bce_by_hand(z1_u, y2_u) + _bce_by_hand(z2_u, y1_u)
    cps_l = _bce_by_hand(z1_l, y2_l) + _bce_by_hand(z2_l, y1_l)
    sup = float(seg_loss(z1_l, y, "dice_bce")) + float(seg_loss(z2_l, y, "dice_bce"))
    assert logs["cps_u"] == pytest.approx(cps_u, rel=1e-5)
    assert logs["cps_l"] == pytest.approx(cps_l, rel=1e-5)
    assert loss.item() == pytest.approx(sup + cps_l + cps_u, rel=1e-5)
    # swapping roles (each network on its own label: self-training) gives another value
    own = _bce_by_hand(z1_u, y1_u) + _bce_by_hand(z2_u, y2_u)
    assert abs(own - cps_u) > 1e-2
    # SSL4MIS: on the unlabeled images only; λ(t) scales the term
    method = _affine_method()
    method.cfg.cps.labeled = False
    method.cfg.consistency_weight = 0.5
    loss, logs = method.loss(lab, unl, step=3, total_steps=10)
    assert "cps_l" not in logs and loss.item() == pytest.approx(sup + 0.5 * cps_u, rel=1e-5)


def test_each_network_gets_the_gradient_of_its_own_terms_only() -> None:
    lab, unl = _batch(2, 1, True, size=4), _batch(3, 2, False, size=4)
    method = _affine_method()
    loss, _ = method.loss(lab, unl, step=3, total_steps=10)
    loss.backward()
    x_l, x_u, y = lab["image"][:, :1], unl["image"][:, :1], lab["mask"]
    # by hand, on fresh leaves: net 1 sees L_sup(z1) + BCE(z1, y2) only, net 2 L_sup(z2) + BCE(z2, y1) only
    bce = nn.functional.binary_cross_entropy_with_logits
    a1, b1 = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    a2, b2 = torch.tensor(-3.0, requires_grad=True), torch.tensor(1.8, requires_grad=True)
    own1 = (seg_loss(a1 * x_l + b1, y, "dice_bce") + bce(a1 * x_l + b1, (x_l <= 0.6).float())
            + bce(a1 * x_u + b1, (x_u <= 0.6).float()))
    own2 = (seg_loss(a2 * x_l + b2, y, "dice_bce") + bce(a2 * x_l + b2, (x_l >= 0.5).float())
            + bce(a2 * x_u + b2, (x_u >= 0.5).float()))
    g1 = torch.autograd.grad(own1, (a1, b1))
    g2 = torch.autograd.grad(own2, (a2, b2))
    net1, net2 = method.student, method.heads["net2"]
    torch.testing.assert_close((net1.a.grad, net1.b.grad), g1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((net2.a.grad, net2.b.grad), g2, rtol=1e-5, atol=1e-6)


def test_unet_pair_trains_both_networks_and_reports_the_second_as_teacher() -> None:
    method, student = _build(rampup_fraction=0.0)
    with torch.no_grad():  # make the two networks differ even more than by their initialisation
        for p in method.heads["net2"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=3, total_steps=10)
    assert torch.isfinite(loss) and {"sup", "sup2", "cps", "cps_l", "cps_u", "lambda", "loss"} <= set(logs)
    assert logs["lambda"] == pytest.approx(1.0) and logs["cps_u"] > 0
    loss.backward()
    assert student.inc[0].weight.grad.abs().sum() > 0
    assert method.heads["net2"].inc[0].weight.grad.abs().sum() > 0
    images = _batch(2, 3, False)["image"]
    net2 = method.heads["net2"]
    out = method.pseudo_labels(images)
    assert set(out) == {"student", "teacher"}
    assert net2.training  # pseudo_labels ran it in eval mode and restored the mode it found
    net2.eval()
    with torch.no_grad():
        torch.testing.assert_close(out["teacher"], net2(images))
    method.train()
    assert not torch.allclose(out["teacher"], out["student"])
    _, logs = method.loss(_batch(2, 1, True), None, step=3, total_steps=10)  # no unlabeled batch
    assert "cps_u" not in logs and "cps_l" in logs


def test_state_round_trip_restores_the_second_network() -> None:
    method, student = _build(rampup_fraction=0.0)
    method.train()
    lab, unl = _batch(2, 1, True), _batch(2, 2, False)
    loss, _ = method.loss(lab, unl, step=0, total_steps=10)
    loss.backward()
    torch.optim.SGD(method.parameters(), lr=0.5).step()
    state = method.state_dict()
    assert state and all(k.startswith("heads.net2.") for k in state)
    torch.manual_seed(1)
    other_student = UNet(UNetConfig(base_width=8))
    other = build_seg_method("cps", SegMethodConfig(rampup_fraction=0.0), other_student)
    other_student.load_state_dict(student.state_dict())
    other.train()
    before, _ = other.loss(lab, unl, step=3, total_steps=10)
    other.load_state_dict(state)
    a, _ = method.loss(lab, unl, step=3, total_steps=10)
    b, _ = other.loss(lab, unl, step=3, total_steps=10)
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and abs(before.item() - a.item()) > 1e-4
    with pytest.raises(CheckpointError):
        other.load_state_dict({k: v for k, v in state.items() if "outc" not in k})


def test_preset_is_the_ssl4mis_setting() -> None:
    from dusss.engine.train import load_train_config

    cfg = load_train_config(None, {"method": "cps", "data": "x", "out": "y"})
    assert cfg.semi.consistency_weight == 0.1 and cfg.semi.rampup_fraction == 1.0 and cfg.semi.cps.labeled
    assert consistency_lambda(cfg.semi, 0, 100) == pytest.approx(0.1 * math.exp(-5))
