"""EMA teacher (eq 13 with the warm-up α_t = min(1 − 1/(t+1), α)) and the sigmoid ramp-up."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dusss.errors import ConfigError
from dusss.models.ema import EMATeacher, ema_alpha, sigmoid_rampup, unwrap
from dusss.models.unet import UNet, UNetConfig


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x * self.w)


def test_teacher_equals_student_at_step_0_and_is_frozen_eval() -> None:
    torch.manual_seed(0)
    student = UNet(UNetConfig(base_width=4))
    ema = EMATeacher(student, decay=0.99)
    s_state, t_state = student.state_dict(), ema.state_dict()
    assert s_state.keys() == t_state.keys()
    for k in s_state:
        assert torch.equal(s_state[k], t_state[k]), k
        assert s_state[k].data_ptr() != t_state[k].data_ptr()
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    x = torch.rand(1, 3, 32, 32)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(ema(x), student(x))
    assert not ema(x).requires_grad


def test_alpha_warm_up_values() -> None:
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == 0.5
    assert ema_alpha(2, 0.99) == pytest.approx(2 / 3)
    assert ema_alpha(99, 0.99) == pytest.approx(0.99)
    assert ema_alpha(1000, 0.99) == 0.99
    assert ema_alpha(5, 0.5) == 0.5


def test_ema_arithmetic_over_steps() -> None:
    student = Tiny()
    ema = EMATeacher(student, decay=0.99)
    assert ema.module.w.item() == 1.0
    with torch.no_grad():
        student.w.fill_(3.0)
    assert ema.update(student, step=0) == 0.0  # α_0 = 0: teacher := student
    assert ema.module.w.item() == pytest.approx(3.0)
    with torch.no_grad():
        student.w.fill_(5.0)
    assert ema.update(student, step=1) == 0.5  # 0.5·3 + 0.5·5 = 4
    assert ema.module.w.item() == pytest.approx(4.0)
    with torch.no_grad():
        student.w.fill_(6.0)
    ema.update(student, step=1000)  # α = 0.99: 0.99·4 + 0.01·6 = 4.02
    assert ema.module.w.item() == pytest.approx(4.02)


def test_buffers_are_copied_by_default_and_averaged_on_request() -> None:
    torch.manual_seed(0)
    student = Tiny()
    copy_ema = EMATeacher(student, decay=0.99)
    avg_ema = EMATeacher(student, decay=0.99, buffers="ema")
    student.train()
    student(torch.randn(8, 1) + 4.0)  # running_mean moves away from 0
    rm = student.bn.running_mean.clone()
    assert rm.abs().item() > 0.1
    copy_ema.update(student, step=1)
    avg_ema.update(student, step=1)
    assert torch.equal(copy_ema.module.bn.running_mean, rm)
    assert torch.equal(copy_ema.module.bn.num_batches_tracked, student.bn.num_batches_tracked)
    torch.testing.assert_close(avg_ema.module.bn.running_mean, 0.5 * rm)  # 0.5·0 + 0.5·rm
    assert avg_ema.module.bn.num_batches_tracked.item() == 1  # integer buffers are copied


def test_state_dict_round_trip() -> None:
    student = Tiny()
    ema = EMATeacher(student)
    with torch.no_grad():
        student.w.fill_(7.0)
    ema.update(student, step=0)
    other = EMATeacher(Tiny())
    other.load_state_dict(ema.state_dict())
    assert other.module.w.item() == 7.0
    assert not other.module.w.requires_grad and not other.module.training


def test_decay_range_checked() -> None:
    with pytest.raises(ConfigError):
        EMATeacher(Tiny(), decay=1.0)


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


def test_batch_norm_teacher_normalises_with_the_batch_and_leaves_running_stats() -> None:
    torch.manual_seed(0)
    student = Tiny()
    with torch.no_grad():
        student.bn.running_mean.fill_(5.0)
        student.bn.running_var.fill_(4.0)
    running = EMATeacher(student, decay=0.9, norm="running")
    batch = EMATeacher(student, decay=0.9, norm="batch")
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    # eval mode: (x - 5) / sqrt(4 + eps); batch statistics: (x - 3) / sqrt(biased var 3.5 + eps)
    torch.testing.assert_close(running(x), (x - 5.0) / math.sqrt(4.0 + 1e-5))
    torch.testing.assert_close(batch(x), (x - 3.0) / math.sqrt(3.5 + 1e-5))
    assert batch.module.bn.running_mean.item() == 5.0 and batch.module.bn.running_var.item() == 4.0
    assert not batch.module.training and not batch.module.bn.training
    with pytest.raises(ConfigError, match="norm"):
        EMATeacher(Tiny(), norm="group")


# -- killing the surviving mutants of tools/mutation.py (docs/mutation.md) -------------------------------------
def test_rampup_of_one_step_and_decay_zero_is_allowed() -> None:
    assert sigmoid_rampup(0.5, 1) == pytest.approx(math.exp(-5 * 0.25))  # T = 1 still ramps: phase 0.5
    student = nn.Linear(2, 1)
    teacher = EMATeacher(student, decay=0.0)  # [0, 1): decay 0 copies the student at every update
    with torch.no_grad():
        student.weight.fill_(3.0)
    teacher.update(student, step=10)
    assert torch.equal(teacher.module.weight, torch.full((1, 2), 3.0))


def test_unwrap_wrappers_and_teacher_accessors() -> None:
    m = nn.Linear(2, 1)
    assert unwrap(nn.DataParallel(m)) is m

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule, which keeps `_orig_mod`
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert unwrap(Compiled(nn.DataParallel(m))) is m
    teacher = EMATeacher(m, decay=0.5)
    params = teacher.parameters()
    assert len(params) == 2 and all(not p.requires_grad for p in params)
    assert teacher.to("cpu") is teacher
    assert teacher.module.weight.device.type == "cpu"
    with pytest.raises(RuntimeError):  # strict: a state dict missing a key is refused
        teacher.load_state_dict({"weight": torch.zeros(1, 2)})
