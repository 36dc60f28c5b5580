"""UA-MT (`uamt`): the binary entropy, the masked MSE (against SSL4MIS's two-channel form) and the threshold ramp
by hand, the T-pass uncertainty from recorded teacher inputs, the method's consistency from an independent
computation with a teacher unlike the student, gradient routing, state round trip, registry and preset."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dusss.engine.train import load_train_config
from dusss.errors import ConfigError
from dusss.methods.baseline_config import UAMTConfig
from dusss.methods.baselines.uamt import UAMTMethod, binary_entropy, uncertainty_masked_mse
from dusss.methods.perturb import PerturbConfig
from dusss.methods.segmentation import SegMethodConfig, build_seg_method
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import square_lesion_batch

S = 32
LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


_batch = functools.partial(square_lesion_batch, size=S)


def _build(noise: float = 0.0, perturb: PerturbConfig | None = None, **ua) -> UAMTMethod:
    """uamt with λ = 1 from the first step and a teacher clearly unlike the student."""
    torch.manual_seed(0)
    cfg = SegMethodConfig(consistency_weight=1.0, rampup_fraction=0.0, perturb=perturb or PerturbConfig(),
                          uamt=UAMTConfig(noise=noise, **ua))
    method = build_seg_method("uamt", cfg, UNet(UNetConfig(base_width=8)))
    assert isinstance(method, UAMTMethod)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method.train()


def test_binary_entropy_by_hand() -> None:
    p = torch.tensor([0.5, 0.9, 0.0, 1.0, 0.2], dtype=torch.float64)
    expected = [LN2, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), 0.0, 0.0,
                -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]
    assert binary_entropy(p).tolist() == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_masked_mse_by_hand_and_equal_to_the_two_channel_softmax_form() -> None:
    z = torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]]]], requires_grad=True)
    t = torch.tensor([[[[0.2, 0.9], [0.5, 0.1]]]])
    m = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    sig = [1 / (1 + math.exp(-v)) for v in (0.0, 1.0, -2.0, 3.0)]
    expected = ((sig[0] - 0.2) ** 2 + (sig[2] - 0.5) ** 2 + (sig[3] - 0.1) ** 2) / 3  # pixel 2 is masked out
    value = uncertainty_masked_mse(z, t, m)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    # SSL4MIS: softmax over 2 channels on both sides, Σ_c m·diff² / (2 Σ m); logits [0, z] give softmax [1 − σ, σ]
    # and a teacher logit log(t / (1 − t)) gives [1 − t, t]
    zs2 = torch.cat([torch.zeros_like(z), z], dim=1).detach()
    zt2 = torch.cat([torch.zeros_like(t), torch.log(t / (1 - t))], dim=1)
    two = ((torch.softmax(zs2, 1) - torch.softmax(zt2, 1)) ** 2 * m).sum() / (2 * m.sum())
    assert float(value.detach()) == pytest.approx(float(two), rel=1e-5)
    value.backward()
    # d/dz of (σ − t)²/3 = 2(σ − t)σ(1 − σ)/3 on kept pixels, 0 on the masked one
    grads = [2 * (s - tt) * s * (1 - s) / 3 * mm for s, tt, mm in zip(sig, (0.2, 0.9, 0.5, 0.1), (1, 0, 1, 1))]
    assert z.grad.flatten().tolist() == pytest.approx(grads, rel=1e-5, abs=1e-9)
    # no pixel kept: an exact 0, graph intact
    zero = uncertainty_masked_mse(z, t, torch.zeros_like(m))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_threshold_ramps_from_075_to_1_ln2() -> None:
    method = _build()
    assert method.threshold(0, 100) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2)
    assert method.threshold(40, 100) == pytest.approx((0.75 + 0.25 * math.exp(-5 * 0.6**2)) * LN2)
    assert method.threshold(100, 100) == pytest.approx(LN2)
    assert method.threshold(500, 100) == pytest.approx(LN2)


class RecordingTeacher:
    """A stand-in teacher: z = 8·(mean over channels of x − 0.6), recording every input it sees."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return 8.0 * (x.mean(1, keepdim=True) - 0.6)


@pytest.mark.parametrize("passes", [8, 3])
def test_uncertainty_is_the_entropy_of_the_mean_of_t_noisy_passes(passes: int) -> None:
    method = _build(noise=0.1, passes=passes)
    fake = RecordingTeacher()
    method.teacher = fake  # type: ignore[assignment]
    x = _batch(3, 2, False)["image"]
    torch.manual_seed(1)
    u = method.uncertainty(x)
    copies = torch.cat(fake.inputs).view(-1, *x.shape)  # every noisy copy of the batch, in call order
    assert copies.shape[0] == passes
    noise = copies - x
    assert float(noise.abs().max()) <= 0.2 + 1e-6 and float(noise.abs().max()) > 0.15  # clamped at ±0.2
    assert not torch.allclose(noise[0], noise[-1])  # independent draws per pass
    p_mean = torch.stack([torch.sigmoid(8.0 * (c.mean(1, keepdim=True) - 0.6)) for c in copies]).mean(0)
    expected = -(p_mean * torch.log(p_mean) + (1 - p_mean) * torch.log(1 - p_mean))
    assert torch.allclose(u, expected, atol=1e-6)
    single = torch.sigmoid(8.0 * (x.mean(1, keepdim=True) - 0.6))  # the entropy of one clean pass differs
    assert not torch.allclose(u, -(single * single.log() + (1 - single) * (1 - single).log()), atol=1e-3)


def _threshold_fraction_for_half(method: UAMTMethod, x_u: torch.Tensor) -> float:
    """The threshold (as a fraction of ln 2) that keeps about half of the teacher's pixels."""
    with torch.no_grad():
        p = torch.sigmoid(method.teacher(x_u))
        h = -(p * p.log() + (1 - p) * (1 - p).log())
    return float(h.median()) / LN2


def test_method_consistency_matches_an_independent_computation() -> None:
    labeled, unlabeled = _batch(2, 1, True), _batch(3, 2, False)
    probe = _build()
    frac = _threshold_fraction_for_half(probe, unlabeled["image"])
    method = _build(threshold_start=frac, threshold_end=frac)  # noise 0: every teacher pass is the same
    _, logs = method.loss(labeled, unlabeled, step=3, total_steps=10)
    x_u = unlabeled["image"]
    with torch.no_grad():  # train mode: the same batch statistics as the loss's passes
        p_t = torch.sigmoid(method.teacher(x_u))
        h = -(p_t * p_t.log() + (1 - p_t) * (1 - p_t).log())
        m = (h < frac * LN2).float()
        p_s = torch.sigmoid(method.student(x_u))
        expected = float((m * (p_s - p_t) ** 2).sum() / m.sum())
        unmasked = float(((p_s - p_t) ** 2).mean())
        swapped_mask = (-(p_s * p_s.log() + (1 - p_s) * (1 - p_s).log()) < frac * LN2).float()
        swapped = float((swapped_mask * (p_t - p_s) ** 2).sum() / swapped_mask.sum())
    assert 0.2 < float(m.mean()) < 0.8 and logs["certain"] == pytest.approx(float(m.mean()), rel=1e-6)
    assert logs["cons"] == pytest.approx(expected, rel=1e-5)
    assert logs["cons"] != pytest.approx(unmasked, rel=1e-3)  # the mask matters
    assert logs["cons"] != pytest.approx(swapped, rel=1e-3)  # the student's uncertainty would give another value
    assert logs["threshold"] == pytest.approx(frac * LN2)
    assert logs["loss"] == pytest.approx(logs["sup"] + logs["cons"], rel=1e-5)


def test_gradient_reaches_the_student_and_never_the_teacher() -> None:
    method = _build(threshold_start=1.0, threshold_end=1.0)
    loss, logs = method.loss(_batch(2, 1, False), _batch(2, 2, False))  # no masks: L_sup is an exact zero
    assert logs["sup"] == 0.0 and logs["cons"] > 0 and logs["certain"] > 0.9
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    for p in (method.student.inc[0].weight, method.student.outc.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_strong_view_mixes_target_and_mask_alike() -> None:
    method = _build(noise=0.1, perturb=PerturbConfig(strong=True, cutmix_p=1.0))
    torch.manual_seed(3)
    loss, logs = method.loss(_batch(2, 1, True), _batch(3, 2, False), step=5, total_steps=10)
    assert torch.isfinite(loss) and 0 <= logs["certain"] <= 1 and logs["cons"] >= 0


def test_state_round_trip_into_a_fresh_instance() -> None:
    a = _build(noise=0.1)
    torch.manual_seed(5)
    b = build_seg_method("uamt", a.cfg, UNet(UNetConfig(base_width=8))).train()
    b.student.load_state_dict(a.student.state_dict())
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)

    def run(m: UAMTMethod) -> float:
        torch.manual_seed(11)  # the same noise draws
        return m.loss(labeled, unlabeled, step=9, total_steps=10)[1]["loss"]

    before = run(b)
    b.load_state_dict(a.state_dict())
    ref, after = run(a), run(b)
    assert after == pytest.approx(ref, rel=1e-6) and before != pytest.approx(ref, rel=1e-6)


def test_registry_preset_and_config_errors() -> None:
    method = build_seg_method("uamt", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    assert isinstance(method, UAMTMethod) and method.uses_unlabeled and method.teacher is not None
    cfg = load_train_config(None, {"method": "uamt", "data": "x", "out": "y"})
    s = cfg.semi
    assert (s.consistency, s.consistency_weight, s.rampup_fraction, s.ema_decay) == ("mse", 0.1, 1.0, 0.99)
    assert (s.perturb.teacher_noise, s.perturb.teacher_noise_clip, s.perturb.pseudo_label) == (0.1, 0.2, "soft")
    assert (s.uamt.passes, s.uamt.noise, s.uamt.noise_clip) == (8, 0.1, 0.2)
    assert (s.uamt.threshold_start, s.uamt.threshold_end, s.uamt.threshold_rampup_fraction) == (0.75, 1.0, 1.0)
    with pytest.raises(ConfigError, match="mse"):
        build_seg_method("uamt", SegMethodConfig(consistency="bce"), UNet(UNetConfig(base_width=8)))
    with pytest.raises(ConfigError, match="soft"):
        build_seg_method("uamt", SegMethodConfig(perturb=PerturbConfig(pseudo_label="hard")),
                         UNet(UNetConfig(base_width=8)))
    with pytest.raises(ConfigError):
        UAMTConfig(passes=0)
