"""MC-Net (`mcnet`): sharpening and the mutual MSE by hand (values and gradients, detached or not), the method's
consistency from an independent computation, gradient routing to both decoders, state round trip, registry,
preset and pseudo-labels."""

from __future__ import annotations

import functools

import pytest
import torch

from dusss.engine.train import load_train_config
from dusss.methods.baseline_config import MCNetConfig
from dusss.methods.baselines.mcnet import BilinearUp, MCNetMethod, mutual_consistency, sharpen
from dusss.methods.segmentation import SegMethodConfig, build_seg_method
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import square_lesion_batch

S = 32


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


_batch = functools.partial(square_lesion_batch, size=S)


def _build(**mc) -> MCNetMethod:
    torch.manual_seed(0)
    cfg = SegMethodConfig(consistency_weight=1.0, rampup_fraction=0.0, mcnet=MCNetConfig(**mc))
    method = build_seg_method("mcnet", cfg, UNet(UNetConfig(base_width=8)))
    assert isinstance(method, MCNetMethod)
    with torch.no_grad():  # the second decoder clearly unlike the first
        for p in method.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method.train()


def _s(p: float, t: float = 0.1) -> float:
    return p ** (1 / t) / (p ** (1 / t) + (1 - p) ** (1 / t))


def test_sharpening_by_hand() -> None:
    p = torch.tensor([0.6, 0.5, 0.2, 0.0, 1.0], dtype=torch.float64)
    expected = [0.6**10 / (0.6**10 + 0.4**10), 0.5, 0.2**10 / (0.2**10 + 0.8**10), 0.0, 1.0]
    assert sharpen(p, 0.1).tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert sharpen(p, 1.0).tolist() == pytest.approx(p.tolist())  # T = 1: identity
    assert torch.allclose(sharpen(1 - p, 0.1), 1 - sharpen(p, 0.1))  # the two-class softmax form is symmetric


def test_mutual_mse_by_hand_values_and_gradients() -> None:
    a, b = [0.6, 0.2], [0.9, 0.5]
    expected = 0.5 * (sum((x - _s(y)) ** 2 for x, y in zip(a, b)) / 2 + sum((y - _s(x)) ** 2 for x, y in zip(a, b)) / 2)
    p1 = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    p2 = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    value = mutual_consistency(p1, p2, 0.1)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-9)
    value.backward()
    # detached targets: d/dp1 of ½·mean((p1 − S(p2))²) only = (p1 − S(p2)) / N
    assert p1.grad.tolist() == pytest.approx([(x - _s(y)) / 2 for x, y in zip(a, b)], rel=1e-9)
    assert p2.grad.tolist() == pytest.approx([(y - _s(x)) / 2 for x, y in zip(a, b)], rel=1e-9)
    # their code (no detach): the targets' own gradient is added, so the gradient changes
    q1 = p1.detach().clone().requires_grad_(True)
    q2 = p2.detach().clone().requires_grad_(True)
    mutual_consistency(q1, q2, 0.1, detach=False).backward()
    assert q1.grad.tolist() != pytest.approx(p1.grad.tolist(), rel=1e-3)
    # roles matter within a term: p1 towards S(p2) is not S(p1) towards p2
    one_way = ((p1 - sharpen(p2, 0.1)) ** 2).mean()
    other_way = ((sharpen(p1, 0.1) - p2) ** 2).mean()
    assert float(one_way.detach()) != pytest.approx(float(other_way.detach()), rel=1e-3)


@pytest.mark.parametrize("on", ["all", "unlabeled"])
def test_method_consistency_matches_an_independent_computation(on: str) -> None:
    method = _build(consistency_on=on)
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)
    _, logs = method.loss(labeled, unlabeled)
    decoder2 = method.heads["decoder2"]
    with torch.no_grad():  # train mode, the same batch statistics as the loss's passes
        images = [labeled["image"], unlabeled["image"]] if on == "all" else [unlabeled["image"]]
        p1s, p2s = [], []
        for x in images:
            z1, feats = method.student(x, return_features=True)
            p1s.append(torch.sigmoid(z1).flatten())
            p2s.append(torch.sigmoid(decoder2(feats.encoder)).flatten())
        p1, p2 = torch.cat(p1s), torch.cat(p2s)
        t = 0.1
        s1 = p1 ** (1 / t) / (p1 ** (1 / t) + (1 - p1) ** (1 / t))
        s2 = p2 ** (1 / t) / (p2 ** (1 / t) + (1 - p2) ** (1 / t))
        expected = 0.5 * (((p1 - s2) ** 2).mean() + ((p2 - s1) ** 2).mean())
    assert logs["cons"] == pytest.approx(float(expected), rel=1e-5)
    assert logs["loss"] == pytest.approx(0.5 * (logs["sup"] + logs["sup2"]) + logs["cons"], rel=1e-5)


def test_consistency_alone_trains_both_decoders_and_the_encoder() -> None:
    method = _build(consistency_on="unlabeled")
    loss, logs = method.loss(_batch(2, 1, False), _batch(2, 2, False))  # no masks: L_sup is an exact zero
    assert logs["sup"] == 0.0 and logs["cons"] > 0
    loss.backward()
    for name, p in [("encoder", method.student.inc[0].weight), ("decoder1", method.student.outc.weight),
                    ("decoder2", method.heads["decoder2"].outc.weight),
                    ("decoder2 bilinear 1x1", method.heads["decoder2"].up4.reduce.weight)]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_second_decoder_is_bilinear_and_cropped() -> None:
    method = _build()
    assert all(isinstance(getattr(method.heads["decoder2"], f"up{i}"), BilinearUp) for i in range(1, 5))
    out = method.pseudo_labels(_batch(2, 3, True, size=20)["image"])
    assert set(out) == {"student", "teacher"}
    assert out["teacher"].shape == out["student"].shape == (2, 1, 20, 20)
    assert not torch.allclose(out["teacher"], out["student"])
    assert method.student.training and method.heads.training  # modes restored


def test_state_round_trip_into_a_fresh_instance() -> None:
    a = _build()
    torch.manual_seed(5)
    b = build_seg_method("mcnet", a.cfg, UNet(UNetConfig(base_width=8))).train()
    b.student.load_state_dict(a.student.state_dict())
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)
    before = b.loss(labeled, unlabeled)[1]["loss"]
    b.load_state_dict(a.state_dict())
    assert any(k.startswith("heads.decoder2.") for k in a.state_dict())
    ref = a.loss(labeled, unlabeled)[1]["loss"]
    after = b.loss(labeled, unlabeled)[1]["loss"]
    assert after == pytest.approx(ref, rel=1e-6) and before != pytest.approx(ref, rel=1e-6)


def test_registry_and_preset() -> None:
    method = build_seg_method("mcnet", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    assert isinstance(method, MCNetMethod) and method.uses_unlabeled
    cfg = load_train_config(None, {"method": "mcnet", "data": "x", "out": "y"})
    assert cfg.semi.consistency_weight == 0.1 and cfg.semi.rampup_fraction == 1.0
    assert cfg.semi.mcnet.temperature == 0.1 and cfg.semi.mcnet.consistency_on == "all"
