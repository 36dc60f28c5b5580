"""Step-2 methods by name: losses, gradient routing, EMA, pseudo-labels, state round trip (tiny U-Net, fake VLM)."""

from __future__ import annotations

import math

import pytest
import torch

from dusss.config import from_dict
from dusss.errors import CheckpointError, ConfigError
from dusss.methods.segmentation import (
    SEG_METHODS,
    AMVLMMethod,
    DuSSSMethod,
    SegMethodConfig,
    build_seg_method,
    consistency_lambda,
)
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import BagOfWordsVLM

S = 32


def _batch(n: int, seed: int, labeled: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, S, S, generator=g)
    masks = torch.zeros(n, 1, S, S)
    texts = []
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, S // 2, (2,), generator=g))
        masks[i, 0, r : r + S // 2, c : c + S // 2] = 1.0
        images[i, :, r : r + S // 2, c : c + S // 2] += 0.5
        texts.append(f"opacity in the {'left' if c < S // 4 else 'right'} lung zone {i}")
    if not labeled:
        masks.zero_()
    return {
        "image": images.clamp(0, 1),
        "mask": masks,
        "has_mask": torch.full((n,), labeled),
        "text": texts,
        "key": [f"img{seed}_{i}.png" for i in range(n)],
    }


def _build(name: str, **cfg) -> tuple:
    torch.manual_seed(0)
    student = UNet(UNetConfig(base_width=8))
    vlm = BagOfWordsVLM()
    method = build_seg_method(name, SegMethodConfig(**cfg), student, vlm if SEG_METHODS[name].needs_vlm else None)
    return method, student, vlm


def test_registry_names() -> None:
    assert {"supervised", "mt", "dusss", "amvlm"} <= set(SEG_METHODS)
    assert SEG_METHODS["amvlm"] is AMVLMMethod and issubclass(AMVLMMethod, DuSSSMethod)
    assert SEG_METHODS["dusss"].needs_vlm and not SEG_METHODS["mt"].needs_vlm
    assert SEG_METHODS["mt"].uses_unlabeled and not SEG_METHODS["supervised"].uses_unlabeled


def test_build_errors() -> None:
    student = UNet(UNetConfig(base_width=4))
    with pytest.raises(ConfigError, match="unknown"):
        build_seg_method("fixmatch", SegMethodConfig(), student)
    with pytest.raises(ConfigError, match="VLM"):
        build_seg_method("dusss", SegMethodConfig(), student, None)


@pytest.mark.parametrize("name", ["supervised", "mt", "dusss", "amvlm"])
def test_loss_is_finite_and_reaches_the_student_not_the_teacher(name: str) -> None:
    method, student, vlm = _build(name, text_gate_dice=0.0)  # gate open: every term of eqs 14-18 present
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=3, total_steps=10)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert student.inc[0].weight.grad is not None and student.inc[0].weight.grad.abs().sum() > 0
    params = {id(p) for p in method.parameters()}
    assert {id(p) for p in student.parameters()} <= params
    assert not any(id(p) in params for p in vlm.parameters())
    assert all(p.grad is None for p in vlm.parameters())
    if method.teacher is not None:
        assert not any(id(p) in params for p in method.teacher.parameters())
        assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
        assert not method.teacher.module.training
    if name in ("dusss", "amvlm"):
        assert {"sup", "semi", "semi_merged", "semi_text", "tg", "text_sup", "lambda"} <= set(logs)
        assert {id(p) for p in method.text_mask.trainable_parameters()} <= params


def test_lambda_ramp_up() -> None:
    cfg = SegMethodConfig(consistency_weight=2.0, rampup_fraction=0.5)
    assert consistency_lambda(cfg, 0, 100) == pytest.approx(2 * math.exp(-5))
    assert consistency_lambda(cfg, 25, 100) == pytest.approx(2 * math.exp(-1.25))
    assert consistency_lambda(cfg, 60, 100) == 2.0
    assert consistency_lambda(SegMethodConfig(rampup_fraction=0.0), 0, 100) == 1.0
    method, _, _ = _build("mt")
    _, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=0, total_steps=10)
    assert logs["lambda"] == pytest.approx(math.exp(-5))


def test_semi_loss_does_not_reach_the_text_mask_generator() -> None:
    method, student, _ = _build("dusss", tg_weight=0.0, text_supervised_weight=0.0, rampup_fraction=0.0)
    gen = method.text_mask
    with torch.no_grad():
        for g in gen.decoder.gates:
            g.fill_(0.5)  # open the gates so that the convs would get gradient if connected
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=5, total_steps=10)
    assert "tg" not in logs and "text_sup" not in logs and logs["semi"] > 0
    loss.backward()
    for name, p in gen.named_parameters():
        if not name.startswith("vlm."):
            assert p.grad is None or p.grad.abs().sum() == 0, name
    # the student still learns from the labeled and unlabeled terms
    assert student.outc.weight.grad.abs().sum() > 0


def test_text_terms_reach_the_generator() -> None:
    method, _, _ = _build("dusss", text_supervised_weight=0.0)
    loss, _ = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=5, total_steps=10)
    loss.backward()
    gen = method.text_mask
    assert all(g.grad.abs() > 0 for g in gen.decoder.gates)  # L_tg
    assert gen.kappa.grad is None or gen.kappa.grad == 0
    method, _, _ = _build("dusss", tg_weight=0.0)
    loss, _ = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=5, total_steps=10)
    loss.backward()
    gen = method.text_mask
    assert gen.kappa.grad.abs() > 0 and gen.beta.grad.abs() > 0  # BCE(z_text, y) on labeled images


def test_after_step_updates_the_teacher_by_ema() -> None:
    method, student, _ = _build("mt")
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    w0 = method.teacher.module.outc.weight.detach().clone()
    loss, _ = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=0, total_steps=10)
    loss.backward()
    opt.step()
    assert torch.equal(method.teacher.module.outc.weight, w0)  # teacher untouched by the optimizer
    method.after_step(0)  # α_0 = 0: teacher := student
    torch.testing.assert_close(method.teacher.module.outc.weight, student.outc.weight)
    before = method.teacher.module.outc.weight.detach().clone()
    with torch.no_grad():
        student.outc.weight.add_(1.0)
    method.after_step(1)  # α_1 = 0.5
    torch.testing.assert_close(method.teacher.module.outc.weight, before + 0.5)


def test_pseudo_labels_keys_and_merge_on_logits() -> None:
    images = _batch(2, 3, False)
    sup, student, _ = _build("supervised")
    student.train()
    rm = student.inc[1].running_mean.clone()
    out = sup.pseudo_labels(images["image"], images["text"])
    assert set(out) == {"student"} and out["student"].shape == (2, 1, S, S)
    assert torch.equal(student.inc[1].running_mean, rm) and student.training  # eval forward, mode restored
    mt, _, _ = _build("mt")
    assert set(mt.pseudo_labels(images["image"])) == {"student", "teacher"}
    closed, _, _ = _build("dusss")  # the gate starts closed: the merged label is the teacher's
    out = closed.pseudo_labels(images["image"], images["text"])
    assert set(out) == {"student", "teacher", "text", "merged"} and not closed.text_gate_open()
    torch.testing.assert_close(out["merged"], out["teacher"])
    du, _, _ = _build("dusss", text_gate_dice=0.0)
    out = du.pseudo_labels(images["image"], images["text"])
    torch.testing.assert_close(out["merged"], out["teacher"] + out["text"])
    assert all(v.shape == (2, 1, S, S) and not v.requires_grad for v in out.values())
    assert (torch.sigmoid(out["merged"]) < 0.5).any()  # paper mode can say "background" (S3 guard)
    repro, _, _ = _build("dusss", merge="prob", text_gate_dice=0.0)
    out = repro.pseudo_labels(images["image"], images["text"])
    assert (torch.sigmoid(out["merged"]) >= 0.5).all()  # the code's probability-space merge


def test_state_dict_round_trip_restores_teacher_and_generator() -> None:
    method, _, vlm = _build("dusss")
    loss, _ = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=0, total_steps=10)
    loss.backward()
    torch.optim.SGD(method.parameters(), lr=0.5).step()
    method.after_step(0)
    with torch.no_grad():
        method.text_mask.decoder.gates[0].fill_(0.3)
    state = method.state_dict()
    assert state and all(k.startswith(("teacher.", "text_mask.")) or k == "text_reliability" for k in state)
    assert not any(k.startswith("text_mask.vlm.") for k in state)
    torch.manual_seed(1)
    other = build_seg_method("dusss", SegMethodConfig(), UNet(UNetConfig(base_width=8)), vlm)
    other.load_state_dict(state)
    images = _batch(2, 3, False)
    a = method.pseudo_labels(images["image"], images["text"])
    b = other.pseudo_labels(images["image"], images["text"])
    torch.testing.assert_close(a["teacher"], b["teacher"])
    torch.testing.assert_close(a["text"], b["text"])
    with pytest.raises(CheckpointError):
        other.load_state_dict({k: v for k, v in state.items() if not k.startswith("teacher.")})


def test_options_and_edge_cases() -> None:
    method, _, _ = _build("dusss", teacher_noise=0.1, text_term=False, semi_loss="dice_bce")
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=2, total_steps=10)
    assert torch.isfinite(loss) and "semi_text" not in logs
    loss, logs = method.loss(_batch(2, 1, True), None, step=2, total_steps=10)  # no unlabeled batch
    assert torch.isfinite(loss) and "semi" not in logs
    mt, _, _ = _build("mt", consistency="mse")
    loss, logs = mt.loss(_batch(2, 1, True), _batch(3, 2, False), step=2, total_steps=10)
    assert torch.isfinite(loss) and "cons" in logs
    sup, _, _ = _build("supervised", seg_loss="bce")
    sup.eval()  # BN running statistics, so that the batch composition does not matter
    batch = _batch(2, 1, True)
    batch["has_mask"] = torch.tensor([True, False])  # only the first image counts
    only_first = {k: v[:1] for k, v in batch.items()}
    torch.testing.assert_close(sup.loss(batch)[0], sup.loss(only_first)[0])


def test_config_from_dict_with_nested_text_mask() -> None:
    cfg = from_dict(SegMethodConfig, {"merge": "prob", "text_mask": {"pairing": "mean", "kappa_init": 5.0}})
    assert cfg.merge == "prob" and cfg.text_mask.pairing == "mean" and cfg.text_mask.kappa_init == 5.0
    with pytest.raises(ConfigError):
        from_dict(SegMethodConfig, {"merge": "probability"})
    with pytest.raises(ConfigError):
        SegMethodConfig(rampup_fraction=1.5)


def test_text_gate_keeps_an_unreliable_text_mask_out_of_the_pseudo_label() -> None:
    from dusss.losses.segmentation import semi_loss

    lab, unl = _batch(2, 1, True), _batch(2, 2, False)
    # Gate at 1.0 can never open: L_semi must equal the teacher-only merged BCE with no eq-17 term.
    method, _, _ = _build("dusss", rampup_fraction=0.0, text_gate_dice=1.0, tg_weight=0.0)
    method.train()
    _, logs = method.loss(lab, unl, step=5, total_steps=10)
    assert logs["text_gate"] == 0.0 and 0.0 <= logs["text_reliability"] <= 1.0
    with torch.no_grad():
        method.student.eval()
        z = method.student(torch.cat([lab["image"], unl["image"]]))[2:]
        method.student.train()
    z_t = method.teacher(unl["image"])
    expected, _ = semi_loss(z, z_t, torch.zeros_like(z_t), "bce", use_text_term=False)
    assert "semi_text" not in logs
    assert logs["semi"] == pytest.approx(float(expected), rel=0.2)  # BN batch vs running stats differ slightly
    # Gate at 0 (the paper): the text term is present.
    method, _, _ = _build("dusss", rampup_fraction=0.0, text_gate_dice=0.0, tg_weight=0.0)
    method.train()
    _, logs = method.loss(lab, unl, step=5, total_steps=10)
    assert logs["text_gate"] == 1.0 and "semi_text" in logs
    # The running reliability is part of the resumable state.
    state = method.state_dict()
    assert "text_reliability" in state
