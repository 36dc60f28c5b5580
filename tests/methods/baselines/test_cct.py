"""CCT (`cct`): the auxiliary-decoder consistency by hand, the feature perturbations, gradient routing (main
decoder detached, encoder and auxiliary decoders trained), state round trip, registry and preset."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from dusss.engine.train import load_train_config
from dusss.methods.baseline_config import CCTConfig
from dusss.methods.baselines.cct import CCTMethod, aux_consistency, feature_drop, feature_noise
from dusss.methods.segmentation import SegMethodConfig, build_seg_method
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import square_lesion_batch

S = 32


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


_batch = functools.partial(square_lesion_batch, size=S)


def _build(**cct) -> CCTMethod:
    torch.manual_seed(0)
    cfg = SegMethodConfig(consistency_weight=1.0, rampup_fraction=0.0, cct=CCTConfig(**cct))
    method = build_seg_method("cct", cfg, UNet(UNetConfig(base_width=8)))
    assert isinstance(method, CCTMethod)
    with torch.no_grad():  # auxiliary decoders clearly unlike the main one
        for p in method.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method.train()


class _Const(nn.Module):
    """A stand-in decoder whose logits are the constant c everywhere (at the padded size)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, encoder: list[torch.Tensor]) -> torch.Tensor:
        return self.scale * torch.full_like(encoder[0][:, :1], self.c)


def test_aux_consistency_by_hand() -> None:
    main = torch.tensor([[[[0.0, 1.0]]]])
    aux = [torch.tensor([[[[2.0, -1.0]]]]), torch.tensor([[[[0.0, 0.0]]]])]
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))
    d1 = ((sig(2.0) - sig(0.0)) ** 2 + (sig(-1.0) - sig(1.0)) ** 2) / 2
    d2 = ((sig(0.0) - sig(0.0)) ** 2 + (sig(0.0) - sig(1.0)) ** 2) / 2
    assert float(aux_consistency(main, aux)) == pytest.approx((d1 + d2) / 2, rel=1e-6)


def test_method_consistency_with_known_decoder_outputs() -> None:
    method = _build()
    method.heads["aux"] = nn.ModuleList([_Const(0.0), _Const(2.0)])
    method.perturbations = ["noise", "dropout"]
    x_u = _batch(2, 2, False)
    _, logs = method.loss(_batch(2, 1, True), x_u, step=0, total_steps=1)
    with torch.no_grad():
        p = torch.sigmoid(method.student(x_u["image"]))  # train mode: the same batch statistics as in the loss
    expected = 0.5 * (((0.5 - p) ** 2).mean() + ((torch.sigmoid(torch.tensor(2.0)) - p) ** 2).mean())
    assert logs["cons"] == pytest.approx(float(expected), rel=1e-5)


def test_feature_perturbations() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 4, 5, 5) + 0.1
    y = feature_noise(x, 0.3)
    ratio = y / x - 1.0
    assert float(ratio.abs().max()) <= 0.3 + 1e-6 and float(ratio.abs().max()) > 0.05
    assert torch.allclose(ratio[0], ratio[1]) and torch.allclose(ratio[0], ratio[2])  # one draw for the batch
    # feature drop: channel-mean map [[1, 2], [3, 4]], threshold 0.5·max = 2 → only the first pixel survives
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 2, 2, 2).clone()
    out = feature_drop(f, 0.5, 0.5)
    assert torch.equal(out[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("detach", [True, False])
def test_gradients_reach_encoder_and_heads_main_decoder_only_without_detach(detach: bool) -> None:
    method = _build(detach_main=detach)
    unlabeled_only = _batch(2, 1, False)  # has_mask False: L_sup is an exact zero, only the consistency is left
    loss, logs = method.loss(unlabeled_only, _batch(2, 2, False), step=0, total_steps=1)
    assert logs["cons"] > 0
    loss.backward()
    student = method.student
    assert student.inc[0].weight.grad is not None and student.inc[0].weight.grad.abs().sum() > 0  # encoder
    for dec in method.heads["aux"]:
        assert dec.outc.weight.grad is not None and dec.outc.weight.grad.abs().sum() > 0
    main_grad = student.outc.weight.grad
    if detach:  # the target σ(z_main) is detached: no gradient to the main decoder
        assert main_grad is None or float(main_grad.abs().sum()) == 0.0
    else:  # SSL4MIS: the MSE reaches the main decoder too
        assert main_grad is not None and float(main_grad.abs().sum()) > 0


def test_aux_consistency_argument_roles() -> None:
    # MSE is symmetric in value, so the roles show in the gradients: only the auxiliary argument gets one
    torch.manual_seed(0)
    main = torch.randn(1, 1, 4, 4, requires_grad=True)
    aux = torch.randn(1, 1, 4, 4, requires_grad=True)
    aux_consistency(main, [aux]).backward()
    assert main.grad is None and aux.grad is not None and float(aux.grad.abs().sum()) > 0


def test_aux_supervised_changes_the_labeled_loss() -> None:
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)
    with_aux = _build(aux_supervised=True)
    torch.manual_seed(3)
    _, logs_a = with_aux.loss(labeled, unlabeled)
    assert logs_a["sup"] == pytest.approx((logs_a["sup_main"] + 3 * logs_a["sup_aux"]) / 4, rel=1e-5)
    main_only = _build(aux_supervised=False)
    torch.manual_seed(3)
    _, logs_b = main_only.loss(labeled, unlabeled)
    assert logs_b["sup"] == pytest.approx(logs_b["sup_main"]) and "sup_aux" not in logs_b
    assert logs_a["sup"] != pytest.approx(logs_b["sup"])


def test_state_round_trip_into_a_fresh_instance() -> None:
    a = _build()
    torch.manual_seed(5)
    b = build_seg_method("cct", a.cfg, UNet(UNetConfig(base_width=8))).train()
    b.student.load_state_dict(a.student.state_dict())
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)
    torch.manual_seed(7)
    before = b.loss(labeled, unlabeled)[1]["loss"]
    b.load_state_dict(a.state_dict())
    assert any(k.startswith("heads.aux.") for k in a.state_dict())
    torch.manual_seed(7)
    ref = a.loss(labeled, unlabeled)[1]["loss"]
    torch.manual_seed(7)
    after = b.loss(labeled, unlabeled)[1]["loss"]
    assert after == pytest.approx(ref, rel=1e-6) and before != pytest.approx(ref, rel=1e-6)


def test_registry_and_preset() -> None:
    method = build_seg_method("cct", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    assert isinstance(method, CCTMethod) and method.uses_unlabeled and len(method.heads["aux"]) == 3
    assert method.perturbations == ["noise", "dropout", "feature_drop"]
    cfg = load_train_config(None, {"method": "cct", "data": "x", "out": "y"})
    assert cfg.semi.consistency_weight == 0.1 and cfg.semi.rampup_fraction == 1.0
    assert cfg.semi.cct.detach_main and cfg.semi.cct.aux_supervised
