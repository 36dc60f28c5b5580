"""BCP (`bcp`): the box mask, the bidirectional mix of images and targets by hand on 4x4 tensors, the largest
connected component, the α weighting, stage 1 and the teacher reset at the stage boundary, the state round trip
and the preset."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import dusss.methods.baselines.bcp as bcp_module
from dusss.errors import CheckpointError
from dusss.methods.baselines.bcp import box_mask, copy_paste, largest_component
from dusss.methods.segmentation import SEG_METHODS, SegMethodConfig, build_seg_method
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
    return build_seg_method("bcp", SegMethodConfig(**cfg), student), student


class Affine(nn.Module):
    """z = a·x[:, :1] + b, recording its inputs."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.a * x[:, :1] + self.b


# 4x4 fixtures: M has its zero box on rows 1-2, columns 1-2
M = torch.ones(1, 1, 4, 4)
M[..., 1:3, 1:3] = 0
IN_BOX = [(r, c) for r in range(4) for c in range(4) if 1 <= r <= 2 and 1 <= c <= 2]
OUT_BOX = [(r, c) for r in range(4) for c in range(4) if (r, c) not in IN_BOX]


def _tiny() -> tuple[dict, dict, torch.Tensor]:
    """Labeled images of constant 0.1 / 0.3, unlabeled 0.2 with bright pixels, and the teacher label by hand."""
    x_l = torch.tensor([0.1, 0.3]).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone()
    y_l = torch.zeros(2, 1, 4, 4)
    y_l[0, 0, 1, 1] = y_l[0, 0, 1, 2] = y_l[0, 0, 0, 3] = 1
    y_l[1, 0, 2, 2] = y_l[1, 0, 3, 0] = 1
    x_u = torch.full((2, 1, 4, 4), 0.2)
    for r, c in [(0, 0), (0, 1), (1, 0), (3, 3)]:  # image 0: a 3-pixel blob and a lone pixel
        x_u[0, 0, r, c] = 0.9
    x_u[1, 0, 2, 1] = x_u[1, 0, 3, 2] = 0.9  # image 1: two diagonal neighbours = one 8-connected blob
    pl = torch.zeros(2, 1, 4, 4)  # teacher z = 10(x − 0.5) ≥ 0 where x = 0.9, then the largest component
    for r, c in [(0, 0), (0, 1), (1, 0)]:
        pl[0, 0, r, c] = 1
    pl[1, 0, 2, 1] = pl[1, 0, 3, 2] = 1
    lab = {"image": x_l, "mask": y_l, "has_mask": torch.ones(2, dtype=torch.bool), "text": ["", ""]}
    unl = {"image": x_u, "mask": torch.zeros_like(y_l), "has_mask": torch.zeros(2, dtype=torch.bool),
           "text": ["", ""]}
    return lab, unl, pl


def _affine_method(monkeypatch: pytest.MonkeyPatch, alpha: float = 0.5):
    method, _ = _build()
    method.cfg.bcp.alpha = alpha
    method.student = Affine(4.0, -0.6)  # its own label would be 1[x ≥ 0.15]: every pixel here
    teacher = Affine(10.0, -5.0).requires_grad_(False)
    method.teacher.module = teacher
    method.self_training = True  # stage 2 already running: no reset of the replaced teacher
    monkeypatch.setattr(bcp_module, "box_mask", lambda h, w, fraction, device="cpu": M.clone())
    return method, teacher


def _region_by_hand(pairs: list[tuple[float, float]]) -> float:
    """½·(1 − (2Σpt + 1)/(Σp + Σt + 1)) + ½·mean BCE over the (logit, target) pairs, in plain floats."""
    ps = [1 / (1 + math.exp(-z)) for z, _ in pairs]
    ts = [t for _, t in pairs]
    dice = 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)
    bce = -sum(t * math.log(p) + (1 - t) * math.log(1 - p) for p, t in zip(ps, ts)) / len(ps)
    return 0.5 * dice + 0.5 * bce


def test_box_mask_and_copy_paste_by_hand() -> None:
    torch.manual_seed(3)
    m = box_mask(6, 9, 2 / 3)
    assert m.shape == (1, 1, 6, 9) and int((m == 0).sum()) == 4 * 6
    rows, cols = torch.nonzero(m[0, 0] == 0, as_tuple=True)
    assert int(rows.max() - rows.min()) == 3 and int(cols.max() - cols.min()) == 5  # one 4x6 box
    a = torch.arange(16.0).view(1, 1, 4, 4)
    b = -torch.ones(1, 1, 4, 4)
    expected = torch.tensor([[0.0, 1, 2, 3], [4, -1, -1, 7], [8, -1, -1, 11], [12, 13, 14, 15]]).view(1, 1, 4, 4)
    torch.testing.assert_close(copy_paste(a, b, M), expected)


def test_largest_component_is_eight_connected_and_keeps_empty_maps_empty() -> None:
    y = torch.zeros(3, 1, 4, 4)
    y[0, 0, 0, 0] = y[0, 0, 0, 1] = y[0, 0, 1, 0] = y[0, 0, 3, 3] = 1  # blob of 3 and a lone pixel
    y[1, 0, 0, 0] = y[1, 0, 1, 1] = y[1, 0, 3, 3] = 1  # diagonal pair (one component) and a lone pixel
    out = largest_component(y)
    expected = torch.zeros(3, 1, 4, 4)
    expected[0, 0, 0, 0] = expected[0, 0, 0, 1] = expected[0, 0, 1, 0] = 1
    expected[1, 0, 0, 0] = expected[1, 0, 1, 1] = 1
    torch.testing.assert_close(out, expected)


def test_bidirectional_mix_of_images_and_targets_and_alpha_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    lab, unl, pl = _tiny()
    method, teacher = _affine_method(monkeypatch, alpha=0.5)
    loss, logs = method.loss(lab, unl, step=8, total_steps=10)
    x_in, x_out = method.student.inputs  # the two student passes: X_in, then X_out
    x_l, y_l, x_u = lab["image"], lab["mask"], unl["image"]
    for i, j in ((0, 1), (1, 0)):  # X_out pairs unlabeled i with the next labeled image j
        for r, c in OUT_BOX:
            assert x_in[i, 0, r, c] == x_l[i, 0, r, c] and x_out[i, 0, r, c] == x_u[i, 0, r, c]
        for r, c in IN_BOX:
            assert x_in[i, 0, r, c] == x_u[i, 0, r, c] and x_out[i, 0, r, c] == x_l[j, 0, r, c]
    # targets by hand: Y_in = y_i outside the box, ŷ_i inside; Y_out = ŷ_i outside, y_j inside
    z_in, z_out = (4 * x_in - 0.6).tolist(), (4 * x_out - 0.6).tolist()
    gt_in = [(z_in[i][0][r][c], y_l[i, 0, r, c].item()) for i in (0, 1) for r, c in OUT_BOX]
    pl_in = [(z_in[i][0][r][c], pl[i, 0, r, c].item()) for i in (0, 1) for r, c in IN_BOX]
    pl_out = [(z_out[i][0][r][c], pl[i, 0, r, c].item()) for i in (0, 1) for r, c in OUT_BOX]
    gt_out = [(z_out[i][0][r][c], y_l[j, 0, r, c].item()) for i, j in ((0, 1), (1, 0)) for r, c in IN_BOX]
    gt = _region_by_hand(gt_in) + _region_by_hand(gt_out)
    unl_part = _region_by_hand(pl_in) + _region_by_hand(pl_out)
    assert logs["gt"] == pytest.approx(gt, rel=1e-5) and logs["pl"] == pytest.approx(unl_part, rel=1e-5)
    assert loss.item() == pytest.approx(gt + 0.5 * unl_part, rel=1e-5)
    # the teacher label kept its largest component: without it the lone pixel (3, 3) of image 0 is foreground
    assert logs["pl_foreground"] == pytest.approx(float(pl.mean()))
    # α on the wrong parts (the ground truth down-weighted instead) gives another value
    assert abs((0.5 * gt + unl_part) - loss.item()) > 1e-3
    loss.backward()
    assert method.student.a.grad.abs() > 0 and method.student.b.grad.abs() > 0
    assert teacher.a.grad is None and teacher.b.grad is None
    # α = 1: the pseudo-labelled parts count fully
    method, _ = _affine_method(monkeypatch, alpha=1.0)
    loss, logs = method.loss(lab, unl, step=8, total_steps=10)
    assert loss.item() == pytest.approx(gt + unl_part, rel=1e-5)
    # swapping the roles (the student labelling for itself) changes the value
    method, _ = _affine_method(monkeypatch)
    method.teacher.module = Affine(4.0, -0.6).requires_grad_(False)
    swapped, _ = method.loss(lab, unl, step=8, total_steps=10)
    assert abs(swapped.item() - (gt + 0.5 * unl_part)) > 1e-3


def test_stage_one_is_labeled_copy_paste_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    lab, unl, _ = _tiny()
    method, _ = _affine_method(monkeypatch)
    method.self_training = False
    loss, logs = method.loss(lab, unl, step=1, total_steps=10)  # 1 < 0.25·10: stage 1
    assert logs["stage"] == 1.0 and "pl" not in logs and not method.self_training
    (x,) = method.student.inputs  # one pass: labeled i outside the box, labeled i + 1 inside
    x_l, y_l = lab["image"], lab["mask"]
    z = (4 * x - 0.6).tolist()
    outside = [(z[i][0][r][c], y_l[i, 0, r, c].item()) for i in (0, 1) for r, c in OUT_BOX]
    inside = [(z[i][0][r][c], y_l[j, 0, r, c].item()) for i, j in ((0, 1), (1, 0)) for r, c in IN_BOX]
    for i, j in ((0, 1), (1, 0)):
        assert all(x[i, 0, r, c] == x_l[j, 0, r, c] for r, c in IN_BOX)
    assert loss.item() == pytest.approx(_region_by_hand(outside) + _region_by_hand(inside), rel=1e-5)
    alone, _ = method.loss(lab, None, step=1, total_steps=10)  # the unlabeled batch plays no part
    assert alone.item() == pytest.approx(loss.item(), rel=1e-6)


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _differs(teacher: nn.Module, student: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_teacher_is_reset_to_the_student_at_the_stage_boundary_once() -> None:
    method, student = _build()
    method.cfg.bcp.pretrain_fraction = 0.5
    _perturb(method.teacher.module)
    method.train()
    lab, unl = _batch(2, 1, True), _batch(2, 2, False)
    _, logs = method.loss(lab, unl, step=4, total_steps=10)
    assert logs["stage"] == 1.0 and not method.self_training and _differs(method.teacher.module, student)
    before = {k: v.clone() for k, v in student.state_dict().items()}  # the step's passes move its BN buffers
    loss, logs = method.loss(lab, unl, step=5, total_steps=10)  # first stage-2 step
    assert logs["stage"] == 2.0 and method.self_training and "pl" in logs
    teacher_state = method.teacher.module.state_dict()
    assert teacher_state.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(teacher_state[name], value), name
    loss.backward()
    assert student.inc[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    _perturb(method.teacher.module)
    method.loss(lab, unl, step=6, total_steps=10)
    assert _differs(method.teacher.module, student)  # no second reset
    # the EMA follows after every step (eq 13): after_step moves the teacher towards the student
    w0 = method.teacher.module.outc.weight.detach().clone()
    method.after_step(6)
    assert not torch.equal(method.teacher.module.outc.weight, w0)


def test_state_round_trip_keeps_the_stage_and_the_teacher() -> None:
    method, student = _build()
    method.train()
    lab, unl = _batch(2, 1, True), _batch(2, 2, False)
    loss, _ = method.loss(lab, unl, step=5, total_steps=10)  # stage 2: the teacher was reset
    loss.backward()
    torch.optim.SGD(method.parameters(), lr=0.5).step()
    method.after_step(5)
    state = method.state_dict()
    assert state["bcp_self_training"].item() == 1.0 and any(k.startswith("teacher.") for k in state)
    torch.manual_seed(1)
    other_student = UNet(UNetConfig(base_width=8))
    other = build_seg_method("bcp", SegMethodConfig(), other_student)
    other_student.load_state_dict(student.state_dict())
    other.load_state_dict(state)
    assert other.self_training
    other.train()
    torch.manual_seed(9)
    a, logs_a = method.loss(lab, unl, step=6, total_steps=10)
    torch.manual_seed(9)
    b, logs_b = other.loss(lab, unl, step=6, total_steps=10)
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and logs_a["pl"] == pytest.approx(logs_b["pl"], rel=1e-6)
    # the restored teacher is the EMA one, not a fresh copy of the student
    assert _differs(other.teacher.module, other_student)
    with pytest.raises(CheckpointError):
        other.load_state_dict({k: v for k, v in state.items() if k != "bcp_self_training"})


def test_registered_and_preset_is_their_setting() -> None:
    from dusss.engine.train import load_train_config

    assert SEG_METHODS["bcp"].uses_unlabeled
    method, _ = _build()
    assert method.teacher is not None and set(method.pseudo_labels(_batch(2, 3, False)["image"])) == {
        "student", "teacher"}
    cfg = load_train_config(None, {"method": "bcp", "data": "x", "out": "y"})
    assert cfg.semi.ema_decay == 0.99 and cfg.semi.ema_buffers == "ema" and cfg.semi.teacher_norm == "batch"
    assert cfg.semi.bcp.alpha == 0.5 and cfg.semi.bcp.pretrain_fraction == 0.25
    assert cfg.semi.bcp.box_fraction == pytest.approx(2 / 3) and cfg.semi.bcp.largest_component
