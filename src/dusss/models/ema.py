"""Mean-Teacher EMA teacher (paper eq 13) and the consistency ramp-up.

eq 13: θ_t ← α_t·θ_t + (1 − α_t)·θ_s, with the authors' warm-up α_t = min(1 − 1/(t + 1), α) (METHOD §3.8),
t counted in global optimizer steps from 0: at t = 0, α_0 = 0 and the teacher becomes a copy of the student;
at t = 1, α_1 = 0.5; from t = 1/(1 − α) − 1 on (99 for α = 0.99) the decay is the configured α.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dusss.config import check
from dusss.models.batchnorm import batch_statistics

BUFFER_MODES = ("copy", "ema")
NORM_MODES = ("batch", "running")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def ema_alpha(step: int, decay: float) -> float:
    """Warm-up decay α_t = min(1 − 1/(t + 1), decay) (eq 13 with the authors' warm-up)."""
    return min(1.0 - 1.0 / (step + 1.0), decay)


def sigmoid_rampup(step: float, rampup_steps: float) -> float:
    """Mean-Teacher ramp-up exp(−5(1 − min(t/T, 1))²): 0.0067 at t = 0, 1 from t = T; 1 when T <= 0."""
    if rampup_steps <= 0:
        return 1.0
    phase = 1.0 - min(max(float(step), 0.0) / float(rampup_steps), 1.0)
    return float(math.exp(-5.0 * phase * phase))


class EMATeacher:
    """EMA copy of a student network (eq 13), always in `eval()` mode and without gradients.

    Construction deep-copies the student (so teacher == student before any update). `update(student, step)`
    averages **parameters** with α_t = min(1 − 1/(t+1), decay). **Buffers** (BatchNorm running mean/var and
    `num_batches_tracked`) are **copied** from the student by default (`buffers="copy"`): the running
    statistics are already averages over batches, and copying keeps them consistent with the student that the
    teacher tracks (the authors' code leaves them out of the EMA altogether, with the teacher in train mode).
    `buffers="ema"` averages floating-point buffers with the same α_t instead (integer buffers are copied).
    Calling the teacher runs it under `torch.no_grad()`.

    `norm` says how the teacher's BatchNorm layers normalise when it is called: `"running"` with the (copied or
    averaged) running statistics, as eval mode does; `"batch"` with the statistics of the batch it is given
    (running buffers untouched), as in SSL4MIS and the DuSSS code, whose teacher stays in train mode. Averaged
    weights do not produce the activations that averaged (or copied) running statistics describe: on the
    phantom set the `"running"` teacher's pseudo-label Dice was 0.58-0.68 where the same weights gave 0.81-0.82
    with batch statistics (docs/method-notes.md).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, buffers: str = "copy", norm: str = "running") -> None:
        check(0.0 <= decay < 1.0, f"EMA decay must be in [0, 1), got {decay}")
        check(buffers in BUFFER_MODES, f"EMA buffers must be one of {list(BUFFER_MODES)}, got {buffers!r}")
        check(norm in NORM_MODES, f"EMA teacher norm must be one of {list(NORM_MODES)}, got {norm!r}")
        self.decay = float(decay)
        self.buffers = buffers
        self.norm = norm
        self.module: nn.Module = copy.deepcopy(unwrap(student))
        self.module.eval()
        self.module.requires_grad_(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher prediction (logits), no gradient, eval mode (BatchNorm per `norm`)."""
        self.module.eval()
        with torch.no_grad():
            if self.norm == "batch":
                with batch_statistics(self.module):
                    return self.module(x)
            return self.module(x)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def to(self, device: torch.device | str) -> EMATeacher:
        self.module.to(device)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """One EMA step after optimizer step `step` (0-based); returns the α_t used."""
        alpha = ema_alpha(step, self.decay)
        student = unwrap(student)
        t_params = dict(self.module.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            raise ValueError("EMA teacher and student have different parameters")
        teacher_list = [t_params[k] for k in t_params]
        student_list = [s_params[k].detach().to(t_params[k].dtype) for k in t_params]
        if teacher_list:
            # θ_t ← θ_t + (1 − α)(θ_s − θ_t) = α θ_t + (1 − α) θ_s
            torch._foreach_lerp_(teacher_list, student_list, 1.0 - alpha)
        t_bufs = dict(self.module.named_buffers())
        for name, s_buf in student.named_buffers():
            t_buf = t_bufs.get(name)
            if t_buf is None:
                raise ValueError(f"EMA teacher has no buffer {name}")
            if self.buffers == "ema" and t_buf.is_floating_point():
                t_buf.lerp_(s_buf.detach().to(t_buf.dtype), 1.0 - alpha)
            else:
                t_buf.copy_(s_buf.detach())
        return alpha

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher network's state dict (flat tensors, safetensors-friendly)."""
        return dict(self.module.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
        self.module.eval()
        self.module.requires_grad_(False)
