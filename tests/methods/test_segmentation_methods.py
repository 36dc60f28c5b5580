"""Step-2 methods by name: losses, gradient routing, EMA, pseudo-labels, state round trip (tiny U-Net, fake VLM)."""

from __future__ import annotations

import math

import pytest
import torch

from dusss.config import from_dict
from dusss.errors import CheckpointError, ConfigError
from dusss.losses.segmentation import seg_loss, semi_loss, soft_bce
from dusss.methods.perturb import PerturbConfig
from dusss.methods.segmentation import (
    SEG_METHODS,
    AMVLMMethod,
    DuSSSMethod,
    SegMethodConfig,
    _decay_groups,
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
    if "text_gate_dice" in cfg:  # tests that set the Dice threshold use the Dice gate
        cfg.setdefault("text_gate", "dice")
    torch.manual_seed(0)
    student = UNet(UNetConfig(base_width=8))
    vlm = BagOfWordsVLM()
    method = build_seg_method(name, SegMethodConfig(**cfg), student, vlm if SEG_METHODS[name].needs_vlm else None)
    return method, student, vlm


def test_registry_names() -> None:
    assert {"supervised", "mt", "unimatch", "dusss", "amvlm"} <= set(SEG_METHODS)
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
    method, student, vlm = _build(name, text_gate_dice=0.0, tg_weight=1.0)  # gate open, L_tg on: every term present
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
    method, _, _ = _build("dusss", text_supervised_weight=0.0, tg_weight=1.0)
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
    assert state and all(k.startswith(("teacher.", "text_mask.")) or k in ("text_reliability", "text_gain") for k in state)
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
    method, _, _ = _build("dusss", perturb=PerturbConfig(teacher_noise=0.1), text_term=False, semi_loss="dice_bce")
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


# -- the semi-supervised core: BatchNorm coupling, a teacher that differs from the student, UniMatch ----------


@pytest.mark.parametrize("forward", ["separate", "joint"])
def test_labeled_loss_depends_on_the_unlabeled_batch_only_in_joint_forward(forward: str) -> None:
    """Root cause of the Mean-Teacher collapse: in one joint pass, BatchNorm's batch statistics carry the
    unlabeled images into the labeled loss (and its gradient); two separate passes keep them apart."""
    method, _, _ = _build("mt", consistency_weight=0.0, student_forward=forward)
    method.train()
    lab = _batch(4, 1, True)
    sups = [method.loss(lab, _batch(4, seed, False), step=3, total_steps=10)[1]["sup"] for seed in (2, 3)]
    if forward == "separate":
        assert sups[0] == sups[1]
    else:
        assert abs(sups[0] - sups[1]) > 1e-4


def _perturbed_teacher(method) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in method.teacher.module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))


def test_mt_consistency_targets_the_teacher_by_hand() -> None:
    """A teacher that differs from the student: loss = L_sup + MSE(σ(z_s), σ(z_t)); swapping roles changes it."""
    method, student, _ = _build("mt", consistency="mse", consistency_weight=1.0, rampup_fraction=0.0)
    _perturbed_teacher(method)
    method.train()
    lab, unl = _batch(2, 1, True), _batch(3, 2, False)
    loss, logs = method.loss(lab, unl, step=4, total_steps=10)
    with torch.no_grad():  # the same train-mode passes the method makes (batch statistics, so deterministic)
        z_l, z_s = student(lab["image"]), student(unl["image"])
        z_t = method.teacher(unl["image"])
    sup = float(seg_loss(z_l, lab["mask"], "dice_bce"))
    cons = float(((torch.sigmoid(z_s) - torch.sigmoid(z_t)) ** 2).mean())
    swapped = float(((torch.sigmoid(z_t) - torch.sigmoid(z_s)) ** 2).mean())  # same value: MSE is symmetric
    assert logs["sup"] == pytest.approx(sup, rel=1e-5)
    assert logs["cons"] == pytest.approx(cons, rel=1e-5) and swapped == pytest.approx(cons, rel=1e-5)
    assert loss.item() == pytest.approx(sup + cons, rel=1e-5)
    # the gradient runs through the student only: with BCE (not symmetric) the direction shows which is which
    method.cfg.consistency = "bce"
    loss, logs = method.loss(lab, unl, step=4, total_steps=10)
    bce_ts = float(soft_bce(z_s, torch.sigmoid(z_t)))
    bce_st = float(soft_bce(z_t, torch.sigmoid(z_s)))
    assert logs["cons"] == pytest.approx(bce_ts, rel=1e-5) and abs(bce_ts - bce_st) > 1e-4
    loss.backward()
    assert all(p.grad is None for p in method.teacher.module.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_mt_hard_confident_targets_and_teacher_noise() -> None:
    """Hard labels keep only confident teacher pixels; with τ above every confidence the term is 0."""
    method, _, _ = _build("mt", consistency="bce", consistency_weight=1.0, rampup_fraction=0.0,
                          perturb=PerturbConfig(pseudo_label="hard", confidence=0.999999))
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=1, total_steps=10)
    assert logs["cons"] == 0.0 and loss.item() == pytest.approx(logs["sup"], rel=1e-6)
    method.cfg.perturb = PerturbConfig(pseudo_label="hard", confidence=0.5)  # every pixel counts
    _, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=1, total_steps=10)
    assert logs["cons"] > 0.1


def test_unimatch_combines_two_strong_views_and_the_feature_stream() -> None:
    cfg = {"consistency": "dice_bce", "consistency_weight": 1.0, "rampup_fraction": 0.0,
               "perturb": PerturbConfig(pseudo_label="hard", confidence=0.5, feature_dropout=0.5, cutmix_p=1.0)}
    method, student, _ = _build("unimatch", **cfg)
    assert method.teacher is None  # the student is its own teacher
    method.train()
    torch.manual_seed(0)
    loss, logs = method.loss(_batch(2, 1, True), _batch(4, 2, False), step=1, total_steps=10)
    # L = L_sup + ¼(ℓ_s1 + ℓ_s2) + ½ℓ_fp, logged as u_s = ½(ℓ_s1 + ℓ_s2) and u_fp = ℓ_fp
    assert logs["cons"] == pytest.approx(0.5 * logs["u_s"] + 0.5 * logs["u_fp"], rel=1e-5)
    assert loss.item() == pytest.approx(logs["sup"] + logs["cons"], rel=1e-5)
    assert logs["confident"] == 1.0 and logs["u_s"] > 0 and logs["u_fp"] > 0
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    # without the feature stream the two strong views share the whole weight
    method.cfg.perturb = PerturbConfig(pseudo_label="hard", confidence=0.5, feature_dropout=0.0)
    _, logs = method.loss(_batch(2, 1, True), _batch(4, 2, False), step=1, total_steps=10)
    assert "u_fp" not in logs and logs["cons"] == pytest.approx(logs["u_s"], rel=1e-6)


def test_presets_give_each_method_its_published_setting_under_file_and_flags(tmp_path) -> None:
    from dusss.config import load_config
    from dusss.engine.train import TrainConfig
    from dusss.methods.segmentation import seg_method_preset

    cfg = load_config(TrainConfig, None, {"method": "mt"}, presets=seg_method_preset("mt"))
    assert cfg.semi.consistency_weight == 0.1 and cfg.semi.perturb.teacher_noise == 0.1
    assert cfg.semi.perturb.teacher_noise_clip == 0.2 and cfg.semi.rampup_fraction == 1.0
    yml = tmp_path / "c.yaml"
    yml.write_text("semi: {consistency_weight: 0.5}\n")
    cfg = load_config(TrainConfig, yml, {"method": "unimatch"}, presets=seg_method_preset("unimatch"))
    assert cfg.semi.consistency_weight == 0.5  # the file wins over the preset
    assert cfg.semi.perturb.pseudo_label == "hard" and cfg.semi.perturb.feature_dropout == 0.5
    assert seg_method_preset("supervised") == {}
    # DuSSS takes hard confident targets too since session 9 (test_dusss_hard_confident_targets_by_hand); its
    # preset keeps the paper's soft targets with the student on the strong view (val chose them on MoNuSeg)
    for name in ("dusss", "amvlm"):
        cfg = load_config(TrainConfig, None, {"method": name}, presets=seg_method_preset(name))
        assert cfg.semi.perturb.strong and cfg.semi.perturb.pseudo_label == "soft"
    assert _build("dusss", perturb=PerturbConfig(pseudo_label="hard"))[0].cfg.perturb.pseudo_label == "hard"
    with pytest.raises(ConfigError, match="separate"):
        SegMethodConfig(student_forward="joint", perturb=PerturbConfig(feature_dropout=0.5))


def test_dusss_student_sees_the_strong_view() -> None:
    """With the strong view on, the student's unlabeled logits differ from the weak-view ones, L_semi stays finite."""
    method, _, _ = _build("dusss", rampup_fraction=0.0, text_gate_dice=0.0,
                          perturb=PerturbConfig(strong=True, cutmix_p=1.0, jitter_p=1.0))
    method.train()
    torch.manual_seed(0)
    loss_s, logs_s = method.loss(_batch(2, 1, True), _batch(3, 2, False), step=5, total_steps=10)
    method.cfg.perturb = PerturbConfig()
    _loss_w, logs_w = method.loss(_batch(2, 1, True), _batch(3, 2, False), step=5, total_steps=10)
    assert torch.isfinite(loss_s) and logs_s["semi"] != pytest.approx(logs_w["semi"], rel=1e-4)
    assert logs_s["sup"] == pytest.approx(logs_w["sup"], rel=1e-6)  # the labeled pass does not see the views


def _dusss_gate_open_step(**semi) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DuSSS loss with the gate open and a perturbed teacher: (loss, logs, z_s, z_t, z_text) on the unlabeled
    batch, the logits recomputed outside the loss."""
    method, student, _ = _build("dusss", rampup_fraction=0.0, text_gate_dice=0.0, tg_weight=0.0,
                                text_supervised_weight=0.0, consistency_weight=1.0, **semi)
    _perturbed_teacher(method)
    method.train()
    lab, unl = _batch(2, 1, True), _batch(3, 2, False)
    loss, logs = method.loss(lab, unl, step=5, total_steps=10)
    assert logs["text_gate"] == 1.0
    with torch.no_grad():
        z_s = student(unl["image"])
        z_t = method.teacher(unl["image"])
        z_text = method.text_mask(unl["image"], list(unl["text"]), with_tg=False)["logits"]
    return loss, logs, z_s, z_t, z_text


def test_dusss_gate_open_semi_loss_by_hand_with_a_distinct_teacher() -> None:
    """Gate open (the paper): L_semi = ½[BCE(z_s, σ(z_t + z_text)) + BCE(z_s, σ(z_text))] with the *teacher's*
    z_t; a perturbed teacher makes swapping student and teacher visible."""
    loss, logs, z_s, z_t, z_text = _dusss_gate_open_step()
    merged = float(soft_bce(z_s, torch.sigmoid(z_t + z_text)))
    text = float(soft_bce(z_s, torch.sigmoid(z_text)))
    assert logs["semi_merged"] == pytest.approx(merged, rel=1e-5)
    assert logs["semi_text"] == pytest.approx(text, rel=1e-5)
    assert logs["semi"] == pytest.approx(0.5 * (merged + text), rel=1e-5)
    swapped = float(soft_bce(z_t, torch.sigmoid(z_s + z_text)))
    assert abs(swapped - merged) > 1e-3  # the student's logits are the prediction, the teacher's the target
    assert loss.item() == pytest.approx(logs["sup"] + logs["semi"], rel=1e-5)


def test_dusss_forwards_its_semi_loss_kind_merge_and_text_term() -> None:
    """Non-default `semi_loss`, `merge` and `text_term` reach `semi_loss` (the defaults of both agree, so only a
    non-default setting shows a dropped argument)."""
    _, logs, z_s, z_t, z_text = _dusss_gate_open_step(semi_loss="dice_bce", merge="prob", text_term=False)
    want, _ = semi_loss(z_s, z_t, z_text, "dice_bce", use_text_term=False, merge="prob")
    assert "semi_text" not in logs
    assert logs["semi"] == pytest.approx(float(want), rel=1e-5)
    assert abs(float(want) - float(semi_loss(z_s, z_t, z_text, use_text_term=False)[0])) > 1e-3


def test_dusss_gate_closed_uses_the_teacher_alone_with_the_configured_semi_loss() -> None:
    method, student, _ = _build("dusss", rampup_fraction=0.0, text_gate_dice=1.0, semi_loss="dice_bce",
                                text_warmup_steps=0)
    _perturbed_teacher(method)
    method.train()
    unl = _batch(3, 2, False)
    _, logs = method.loss(_batch(2, 1, True), unl)
    assert logs["text_gate"] == 0.0 and "semi_text" not in logs
    with torch.no_grad():
        z_s, z_t = student(unl["image"]), method.teacher(unl["image"])
    assert logs["semi"] == pytest.approx(float(seg_loss(z_s, torch.sigmoid(z_t), "dice_bce")), rel=1e-5)


def test_dusss_refuses_labeled_and_unlabeled_images_of_different_sizes() -> None:
    method, _, _ = _build("dusss")
    method.train()
    small = _batch(2, 2, False)
    small["image"] = small["image"][..., :16, :16]
    with pytest.raises(ValueError, match="labeled and unlabeled images must have the same size"):
        method.loss(_batch(2, 1, True), small)


@pytest.mark.parametrize("name", ["mt", "unimatch", "dusss"])
def test_a_step_without_an_unlabeled_batch_is_the_labeled_loss_alone(name: str) -> None:
    method, _, _ = _build(name, tg_weight=0.0, text_supervised_weight=0.0)
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), None, step=3, total_steps=10)
    assert not {"cons", "semi", "semi_merged", "u_s"} & set(logs)
    assert float(loss.detach()) == pytest.approx(logs["sup"], rel=1e-6)


def test_weight_decay_goes_to_matrices_and_filters_not_to_vectors_or_scalars() -> None:
    conv, lin, bias, scalar = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((2, 2, 3, 3), (4, 3), (4,), ()))
    decay, rest = _decay_groups([conv, lin, bias, scalar], 0.1, 0.01)
    assert [id(p) for p in decay["params"]] == [id(conv), id(lin)] and decay["weight_decay"] == 0.01
    assert [id(p) for p in rest["params"]] == [id(bias), id(scalar)] and rest["weight_decay"] == 0.0
    assert decay["lr"] == rest["base_lr"] == 0.1


def test_dusss_hard_confident_targets_by_hand() -> None:
    """`perturb.pseudo_label: hard` (gate open): eqs 16-17 on 1[q ≥ 0.5] where max(q, 1 − q) ≥ τ."""
    _, logs, z_s, z_t, z_text = _dusss_gate_open_step(perturb=PerturbConfig(pseudo_label="hard", confidence=0.6))
    q_m, q_x = torch.sigmoid(z_t + z_text), torch.sigmoid(z_text)
    merged = float(soft_bce(z_s, (q_m >= 0.5).float(), weight=(torch.maximum(q_m, 1 - q_m) >= 0.6).float()))
    text = float(soft_bce(z_s, (q_x >= 0.5).float(), weight=(torch.maximum(q_x, 1 - q_x) >= 0.6).float()))
    assert logs["semi_merged"] == pytest.approx(merged, rel=1e-5)
    assert logs["semi_text"] == pytest.approx(text, rel=1e-5, abs=1e-7)
    assert abs(merged - float(soft_bce(z_s, q_m))) > 1e-3  # not the soft target


def test_text_supervised_term_is_dice_bce_by_default_and_bce_on_request() -> None:
    lab, unl = _batch(4, 0, True), _batch(4, 1, False)
    for kind in ("dice_bce", "bce"):
        method, _, _ = _build("dusss", text_supervised_loss=kind, tg_weight=0.0, text_gate_holdout=0.0)
        _, logs = method.loss(lab, unl, 0, 10)
        method.text_mask.eval()
        with torch.no_grad():
            z = method.text_mask(lab["image"], lab["text"], with_tg=False)["logits"]
        assert logs["text_sup"] == pytest.approx(float(seg_loss(z, lab["mask"], kind)), abs=1e-5)


def test_param_groups_put_the_text_mask_generator_at_its_own_lr() -> None:
    method, _, _ = _build("dusss", text_mask_lr=1e-2)
    groups = method.param_groups(1e-3, 1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in method.parameters())  # every trainable once
    text_ids = {id(p) for p in method.text_mask.trainable_parameters()}
    for g in groups:
        is_text = {id(p) in text_ids for p in g["params"]}
        assert len(is_text) == 1
        assert g["lr"] == g["base_lr"] == (1e-2 if is_text == {True} else 1e-3)
        assert g["weight_decay"] == (1e-4 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    plain, _, _ = _build("dusss", text_mask_lr=0.0)  # 0 = the run's lr for every group
    assert {g["lr"] for g in plain.param_groups(1e-3, 1e-4)} == {1e-3}
    assert SegMethodConfig().text_mask_lr == 1e-2
    assert len(_build("mt")[0].param_groups(1e-3, 0.0)) == 2


def test_warmup_fits_the_text_mask_on_labeled_images_and_leaves_the_student_alone() -> None:
    method, student, _ = _build("dusss", text_mask_lr=1e-2, tg_weight=0.0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = _batch(8, 0, True)

    def dice_now() -> float:
        from dusss.metrics import dice_score

        method.text_mask.eval()
        with torch.no_grad():
            z = method.text_mask(batch["image"], batch["text"], with_tg=False)["logits"]
        return float(dice_score(torch.sigmoid(z), batch["mask"]).mean())

    start = dice_now()
    logs = method.warmup(iter([batch] * 60), 60, lr=1e-3, weight_decay=0.0)
    assert dice_now() > start + 0.3, (start, dice_now())
    assert 0.0 < logs["text_reliability"] <= 1.0 and float(method.text_reliability) == logs["text_reliability"]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_warmup_step_without_usable_rows_still_joins_the_gradient_sync_and_moves_nothing() -> None:
    """A rank whose batch has no mask left (all held out or unlabeled) must still take part in the
    all-reduce the other ranks start, with no gradient of its own; in one process it changes nothing."""
    method, _, _ = _build("dusss", text_mask_lr=1e-2, tg_weight=0.0)
    batch = _batch(4, 0, True)
    batch["has_mask"] = torch.zeros(4, dtype=torch.bool)
    params = method.text_mask.trainable_parameters()
    before = [p.detach().clone() for p in params]
    seen: list[list[bool]] = []
    method.warmup(iter([batch] * 3), 3, lr=1e-3, weight_decay=0.1,
                  sync=lambda ps: seen.append([p.grad is None for p in ps]))
    assert len(seen) == 3 and all(all(s) for s in seen)  # one sync per step, no local gradient
    assert all(torch.equal(b, p) for b, p in zip(before, params))  # weight decay did not act either


def test_sub_reports_swap_in_the_report_and_mask_of_a_subset_of_the_lesions() -> None:
    from dusss.data.caption import caption_mask

    batch = _batch(16, 0, True)  # one square lesion per image
    method, _, _ = _build("dusss", text_sub_reports=1.0)
    torch.manual_seed(1)
    texts, y, replaced = method._sub_reports(batch["text"], batch["mask"], batch["has_mask"])
    assert bool(replaced.all())
    dropped = 0
    for text, sub, full in zip(texts, y, batch["mask"]):
        if sub.sum() == 0:
            dropped += 1
            assert text == "No pulmonary infection."
        else:
            assert torch.equal(sub, full) and text == caption_mask(full[0].numpy().astype("uint8"))
    assert 3 <= dropped <= 13  # each lesion kept with probability 1/2
    off, _, _ = _build("dusss")
    same_texts, same_y, none = off._sub_reports(batch["text"], batch["mask"], batch["has_mask"])
    assert not bool(none.any())
    assert same_texts == batch["text"] and torch.equal(same_y, batch["mask"])


def test_text_dice_on_empty_false_keeps_only_bce_on_empty_targets() -> None:
    from dusss.losses.segmentation import dice_loss, soft_bce

    z = torch.randn(2, 1, S, S)
    y = torch.zeros(2, 1, S, S)
    y[0, :, 2:6, 2:6] = 1.0  # row 1 has an empty target
    has = torch.ones(2, dtype=torch.bool)
    bce, dice = soft_bce(z, y, reduction="none"), dice_loss(z, y, reduction="none")
    on, _, _ = _build("dusss")
    off, _, _ = _build("dusss", text_dice_on_empty=False)
    torch.testing.assert_close(on._text_supervised(z, y, has), (0.5 * (bce + dice)).mean())
    torch.testing.assert_close(off._text_supervised(z, y, has), (0.5 * (bce[0] + dice[0]) + 0.5 * bce[1]) / 2)


def test_swap_reports_give_the_next_image_s_report_and_the_lesions_it_describes() -> None:
    from dusss.data.caption import described_lesions

    batch = _batch(6, 1, True)
    has = torch.tensor([True, True, False, True, True, True])
    method, _, _ = _build("dusss", text_swap_reports=1.0)
    texts, y, replaced = method._sub_reports(batch["text"], batch["mask"], has)
    assert replaced.tolist() == has.tolist()  # every row with a mask, none without
    rows = [0, 1, 3, 4, 5]
    for pos, i in enumerate(rows):
        j = rows[(pos + 1) % len(rows)]  # the next row with a mask, cyclically (row 2 has none)
        text, target = described_lesions(batch["mask"][i, 0].numpy(), batch["mask"][j, 0].numpy())
        assert texts[i] == text and torch.equal(y[i, 0], torch.from_numpy(target).float())
    assert texts[2] == batch["text"][2] and torch.equal(y[2], batch["mask"][2])
    alone = torch.tensor([True, False, False, False, False, False])  # no other image to take a report from
    same_texts, _, none = method._sub_reports(batch["text"], batch["mask"], alone)
    assert not bool(none.any()) and same_texts == batch["text"]



def test_swap_reports_only_for_the_chosen_rows_never_over_a_sub_report_and_with_two_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dusss.data import caption

    batch = _batch(6, 1, True)
    has = torch.ones(6, dtype=torch.bool)
    half, _, _ = _build("dusss", text_swap_reports=0.5)
    torch.manual_seed(1)
    chosen = torch.rand(6) < 0.5
    assert 0 < int(chosen.sum()) < 6 and not bool(chosen[0])  # a row left out comes before chosen ones
    torch.manual_seed(1)
    _, _, replaced = half._sub_reports(batch["text"], batch["mask"], has)
    assert replaced.tolist() == chosen.tolist()
    two = torch.tensor([True, True, False, False, False, False])
    _, _, replaced = _build("dusss", text_swap_reports=1.0)[0]._sub_reports(batch["text"], batch["mask"], two)
    assert replaced.tolist() == two.tolist()  # two rows with a mask swap their reports
    calls = []
    real = caption.described_lesions
    monkeypatch.setattr(caption, "described_lesions", lambda *a: calls.append(a) or real(*a))
    both, _, _ = _build("dusss", text_sub_reports=1.0, text_swap_reports=1.0)
    _, _, replaced = both._sub_reports(batch["text"], batch["mask"], has)
    assert bool(replaced.all()) and calls == []  # every row got a sub-report, so none is swapped on top


def test_gain_gate_opens_only_while_the_merge_beats_the_teacher_on_labeled_images() -> None:
    method, _, _ = _build("dusss", rampup_fraction=0.0)
    assert method.cfg.text_gate == "gain" and not method.text_gate_open()
    x, y = torch.rand(2, 3, S, S), torch.zeros(2, 1, S, S)
    y[:, :, 4:12, 4:12] = 1.0
    teacher = method.teacher
    with torch.no_grad():  # a teacher that says "lesion" everywhere
        teacher.module.outc.weight.zero_()
        teacher.module.outc.bias.fill_(3.0)
    use = torch.ones(2, dtype=torch.bool)
    text = torch.full_like(y, -20.0)
    text[y > 0] = 20.0  # a perfect text mask: the merge removes the teacher's false positives
    method._update_text_gain(x, text, y, use)
    # Dice(teacher) = 2·64/(1024 + 64), Dice(merged) = 1: gain (1 − 128/1088), one EMA step from 0 at 0.9
    assert float(method.text_gain) == pytest.approx(0.1 * (1 - 128 / 1088), abs=1e-6)
    assert method.text_gate_open()
    for _ in range(30):  # an empty text mask vetoes the teacher everywhere: negative gain closes the gate
        method._update_text_gain(x, torch.full_like(y, -20.0), y, use)
    assert float(method.text_gain) < 0 and not method.text_gate_open()
    state = method.state_dict()
    assert state["text_gain"].item() == pytest.approx(float(method.text_gain))


def test_gain_gate_averages_the_gain_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.distributed every rank all-reduces [gain sum, image count], also a rank with no held-out
    image (else the collective would hang), so all ranks keep one `text_gain`."""
    import torch.distributed as tdist

    method, _, _ = _build("dusss", rampup_fraction=0.0)
    x, y = torch.rand(2, 3, S, S), torch.zeros(2, 1, S, S)
    y[:, :, 4:12, 4:12] = 1.0
    with torch.no_grad():
        method.teacher.module.outc.weight.zero_()
        method.teacher.module.outc.bias.fill_(3.0)
    text = torch.full_like(y, -20.0)
    text[y > 0] = 20.0
    calls: list[torch.Tensor] = []

    def all_reduce(t: torch.Tensor) -> None:  # the other rank: 2 images with gain −0.5 each
        calls.append(t.clone())
        t += torch.tensor([-1.0, 2.0], dtype=t.dtype)

    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    method._update_text_gain(x, text, y, torch.ones(2, dtype=torch.bool))
    g = 1 - 128 / 1088  # this rank's per-image gain (previous test)
    assert calls[0].tolist() == pytest.approx([2 * g, 2.0])
    assert float(method.text_gain) == pytest.approx(0.1 * (2 * g - 1.0) / 4, abs=1e-6)
    before = float(method.text_gain)
    method._update_text_gain(x, text, y, torch.zeros(2, dtype=torch.bool))  # no image here: still reduces
    assert calls[1].tolist() == [0.0, 0.0]
    assert float(method.text_gain) == pytest.approx(0.9 * before + 0.1 * (-0.5), abs=1e-6)


def test_gate_holdout_is_a_fixed_share_of_keys_left_out_of_the_text_term() -> None:
    import zlib

    batch = _batch(16, 0, True)
    method, _, _ = _build("dusss", text_gate_holdout=0.5, rampup_fraction=0.0)
    held = method._gate_holdout(batch, 16)
    expected = [zlib.crc32(k.encode()) % 1000 < 500 for k in batch["key"]]
    assert held.tolist() == expected and 0 < sum(expected) < 16
    assert not method._gate_holdout(batch, 16).logical_xor(held).any()  # the same images every time
    assert not _build("dusss", text_gate_dice=0.3)[0]._gate_holdout(batch, 16).any()  # Dice gate: none
    # the supervised text term sees only the other images: it equals the masked mean over them
    _, logs = method.loss(batch, None, 0, 10)
    method.text_mask.eval()
    with torch.no_grad():
        z = method.text_mask(batch["image"], batch["text"], with_tg=False)["logits"]
    per_image = seg_loss(z, batch["mask"], "dice_bce", reduction="none")
    assert logs["text_sup"] == pytest.approx(float(per_image[~held].mean()), abs=1e-5)


@pytest.mark.parametrize("update", [True, False])
def test_clean_unlabeled_pass_updates_running_stats_only_when_asked(update: bool) -> None:
    """`perturb.bn_update_clean_unlabeled`: the Mean Teacher's clean unlabeled pass moves the student's BatchNorm
    running statistics (SSL4MIS) or leaves them as the labeled pass set them; the loss is the same either way."""
    lab, unl = _batch(2, 1, True), _batch(2, 2, False)
    unl["image"] = unl["image"] * 3.0  # far from the labeled batch, so its statistics are visible
    results = []
    for flag in (update, True):
        method, student, _ = _build("mt", perturb=PerturbConfig(bn_update_clean_unlabeled=flag))
        method.train()
        loss, _ = method.loss(lab, unl, step=0, total_steps=10)
        results.append((float(loss), student.inc[1].running_mean.clone(), int(student.inc[1].num_batches_tracked)))
    torch.manual_seed(0)
    alone = UNet(UNetConfig(base_width=8)).train()
    alone(lab["image"])  # the labeled pass only
    (loss, mean, tracked), (ref_loss, ref_mean, ref_tracked) = results
    assert loss == pytest.approx(ref_loss) and ref_tracked == 2  # the default: labeled and unlabeled pass
    if update:
        assert tracked == 2 and torch.equal(mean, ref_mean)
    else:
        assert tracked == 1 and torch.allclose(mean, alone.inc[1].running_mean) and not torch.allclose(mean, ref_mean)


# -- mutation-found blind spots (docs/mutation.md): CutMix of the targets, term weights and signs ------------

SOFTPLUS_8 = math.log1p(math.exp(-8.0))  # BCE of logit 8 against target 1 (and of −8 against 0)


class _Pointwise(torch.nn.Module):
    """logits = scale·(channel mean − ½) per pixel: the logits of a CutMixed view are the CutMix of the weak
    view's logits, so a target CutMixed like the student's view matches the student exactly. Records the
    `feature_dropout` of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.dropouts: list[float] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        self.dropouts.append(feature_dropout)
        self.inputs.append(x.detach().clone())
        return self.scale * (x.mean(1, keepdim=True) - 0.5)


class _StubTextMask(torch.nn.Module):
    """A text-mask generator whose logits are the pointwise student's (so that the gate-open targets, merged and
    text, are CutMixed like the view too)."""

    def __init__(self) -> None:
        super().__init__()
        self.kappa, self.beta = torch.tensor(1.0), torch.tensor(0.0)

    def forward(self, x: torch.Tensor, texts: list[str], with_tg: bool = False) -> dict:
        return {"logits": 20.0 * (x.mean(1, keepdim=True) - 0.5), "loss_tg": None}


def _two_flat_images(second: float) -> dict:
    """Unlabeled batch of two flat images, 0.9 (logit 8) and `second`; CutMix pastes a box of each into the other."""
    images = torch.stack([torch.full((3, S, S), 0.9), torch.full((3, S, S), second)])
    return {"image": images, "text": ["left lung", "right lung"], "key": ["u0.png", "u1.png"]}


def _cutmix_only(**kw) -> PerturbConfig:
    return PerturbConfig(strong=True, jitter_p=0.0, blur_p=0.0, cutmix_p=1.0, cutmix_area=(0.2, 0.4), **kw)


def _pointwise_method(name: str, **cfg) -> tuple:
    torch.manual_seed(0)
    student = _Pointwise()
    method = build_seg_method(name, SegMethodConfig(**cfg), student,
                              BagOfWordsVLM() if SEG_METHODS[name].needs_vlm else None)
    method.train()
    return method, student


def test_mt_consistency_target_is_cutmixed_like_the_student_view() -> None:
    """Box areas 20-40 %: an unmixed target would cost (σ(8) − σ(−8))² ≈ 1 on every box pixel."""
    method, _ = _pointwise_method("mt", consistency="mse", rampup_fraction=0.0, perturb=_cutmix_only())
    _, logs = method.loss(_batch(2, 1, True), _two_flat_images(0.1))
    assert logs["cons"] < 1e-10


def test_unimatch_cutmixes_targets_and_confidence_weights_of_both_strong_views() -> None:
    """Image 1 is flat 0.5 (logit 0, confidence ½ < τ): its pixels weigh 0 wherever CutMix puts them. With the
    targets and weights CutMixed like each strong view, only confident pixels of the 0.9 image count, each
    BCE(8, 1) = softplus(−8), summed over the weighted pixels and divided by all pixels; an unmixed weight or
    target counts box pixels at BCE(0, 1) = log 2."""
    method, _ = _pointwise_method("unimatch", consistency="bce", rampup_fraction=0.0,
                                  perturb=_cutmix_only(pseudo_label="hard", confidence=0.95))
    _, logs = method.loss(_batch(2, 1, True), _two_flat_images(0.5))
    assert 0.4 * SOFTPLUS_8 < logs["u_s"] <= SOFTPLUS_8 * 1.0001
    assert logs["confident"] == pytest.approx(0.5)  # the 0.9 image's pixels reach τ, the 0.5 image's do not


def test_unimatch_strong_views_are_on_whatever_the_config_says_and_the_fp_stream_drops_features() -> None:
    """`perturb.strong: false` still gives UniMatch its strong (CutMixed) views; the student's passes are the
    labeled batch, the weak view (no dropout), both strong views in one batch, then the weak view with
    Dropout2d(`feature_dropout`)."""
    method, student = _pointwise_method(
        "unimatch", rampup_fraction=0.0,
        perturb=PerturbConfig(strong=False, jitter_p=0.0, blur_p=0.0, cutmix_p=1.0, cutmix_area=(0.2, 0.4),
                              feature_dropout=0.3))
    unl = _two_flat_images(0.1)
    method.loss(_batch(2, 1, True), unl)
    assert student.dropouts == [0.0, 0.0, 0.0, 0.3]
    weak, strong, fp = student.inputs[1], student.inputs[2], student.inputs[3]
    assert torch.equal(weak, unl["image"]) and torch.equal(fp, unl["image"])
    assert strong.shape[0] == 4
    for view in strong:  # every strong view pastes a box of the other flat image
        assert sorted(view.unique().tolist()) == pytest.approx([0.1, 0.9])


@pytest.mark.parametrize("gate", ["closed", "open"])
def test_dusss_semi_targets_are_cutmixed_and_hard_with_the_confidence_of_the_preset(gate: str) -> None:
    """Hard confident targets (τ 0.95) CutMixed like the strong view: every pixel costs BCE(±8, 1/0) =
    softplus(−8), merged (teacher + text logits, gate open) and text term alike. Soft targets would cost the
    entropy of σ(8), 9× more; an unmixed target, 8 on each box pixel."""
    method, _ = _pointwise_method("dusss", text_gate="dice", text_gate_dice=0.0 if gate == "open" else 1.0,
                                  text_warmup_steps=0, perturb=_cutmix_only(pseudo_label="hard", confidence=0.95))
    method.text_mask = _StubTextMask()
    _, logs = method.loss(_batch(2, 1, True), _two_flat_images(0.1))
    assert logs["text_gate"] == (1.0 if gate == "open" else 0.0)
    assert logs["semi_merged"] == pytest.approx(SOFTPLUS_8, rel=1e-3)
    if gate == "open":
        assert logs["semi_text"] == pytest.approx(SOFTPLUS_8, rel=1e-3)
    else:
        assert "semi_text" not in logs


def test_feature_dropout_reaches_only_the_student_s_unlabeled_pass() -> None:
    method, student = _pointwise_method("mt", perturb=PerturbConfig(feature_dropout=0.5))
    method.loss(_batch(2, 1, True), _two_flat_images(0.1))
    assert student.dropouts == [0.0, 0.5]  # labeled pass (default), then the unlabeled pass with the dropout
    student.dropouts.clear()
    method, student = _pointwise_method("mt")
    method.loss(_batch(2, 1, True), _two_flat_images(0.1))
    assert student.dropouts == [0.0, 0.0]


@pytest.mark.parametrize("name", ["mt", "unimatch", "dusss", "amvlm"])
def test_total_loss_is_the_weighted_sum_of_its_logged_terms(name: str) -> None:
    """loss = L_sup + λ·L_u + tg_weight·L_tg + text_supervised_weight·L_text_sup, with λ from the ramp and each
    weight ≠ 1, so a dropped weight or a flipped sign shows."""
    cfg = {"consistency_weight": 0.7, "rampup_fraction": 0.5}
    text = name in ("dusss", "amvlm")
    if text:
        cfg.update(text_gate_dice=0.0, tg_weight=0.3, text_supervised_weight=0.4)
    method, _, _ = _build(name, **cfg)
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=3, total_steps=10)
    lam = consistency_lambda(method.cfg, 3, 10)
    assert logs["lambda"] == pytest.approx(lam) and 0 < lam < 0.7
    want = logs["sup"] + lam * logs["semi" if text else "cons"]
    assert logs["loss"] == pytest.approx(float(loss), rel=1e-6)
    if text:
        assert logs["tg"] > 0 and logs["text_sup"] > 0
        want += 0.3 * logs["tg"] + 0.4 * logs["text_sup"]
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_sup_loss_uses_the_configured_kind_over_the_images_with_a_mask_only() -> None:
    """`seg_loss: bce` reaches L_sup; a batch with one mask of two is the mean over that one image (not halved);
    a batch without masks gives exactly 0 and no gradient."""
    method, student, _ = _build("supervised", seg_loss="bce")
    method.train()
    batch = _batch(2, 1, True)
    batch["has_mask"] = torch.tensor([True, False])
    loss, _ = method.loss(batch)
    with torch.no_grad():
        z = student(batch["image"])
    assert float(loss) == pytest.approx(float(seg_loss(z[:1], batch["mask"][:1], "bce")), rel=1e-5)
    no_mask = {k: v for k, v in batch.items() if k not in ("mask", "has_mask")}
    loss, logs = method.loss(no_mask)
    assert float(loss) == 0.0 and logs["sup"] == 0.0
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in student.parameters())


def test_methods_forward_their_teacher_norm_and_text_mask_settings() -> None:
    for norm in ("batch", "running"):
        assert _build("mt", teacher_norm=norm)[0].teacher.norm == norm
    method, _, _ = _build("dusss")
    assert method.text_mask.cfg.skip_channels == 16  # SegMethodConfig's text_mask default, not TextMaskConfig's


def test_warmup_minimises_l_tg_with_its_weight() -> None:
    """L_tg alone (text_supervised_weight 0): the warm-up lowers it; a flipped sign or weight would raise it."""
    method, _, _ = _build("dusss", text_mask_lr=1e-2, tg_weight=0.5, text_supervised_weight=0.0)
    batch = _batch(8, 0, True)
    first = method.warmup(iter([batch]), 1, lr=1e-3, weight_decay=0.0)["tg"]
    last = method.warmup(iter([batch] * 30), 30, lr=1e-3, weight_decay=0.0)["tg"]
    assert last < first - 0.05, (first, last)


@pytest.mark.parametrize("text_lr", [0.0, 3e-2])
def test_warmup_steps_at_the_text_mask_lr_or_the_run_lr(text_lr: float) -> None:
    """AdamW's first step moves each weight with a gradient by about its lr (`text_mask_lr`; 0 = the run's)."""
    method, _, _ = _build("dusss", text_mask_lr=text_lr, tg_weight=0.0)
    params = method.text_mask.trainable_parameters()
    before = [p.detach().clone() for p in params]
    method.warmup(iter([_batch(4, 0, True)]), 1, lr=1e-3, weight_decay=0.0)
    step = max(float((p - b).abs().max()) for p, b in zip(params, before))
    assert step == pytest.approx(text_lr or 1e-3, rel=0.01)


def test_warmup_fits_only_the_images_the_gain_gate_does_not_hold_out() -> None:
    method, _, _ = _build("dusss", text_mask_lr=1e-2, tg_weight=0.0, text_gate_holdout=0.5)
    batch = _batch(16, 0, True)
    held = method._gate_holdout(batch, 16)
    params = method.text_mask.trainable_parameters()

    def moved(rows: torch.Tensor) -> bool:
        b = {**batch, "has_mask": rows}
        before = [p.detach().clone() for p in params]
        method.warmup(iter([b]), 1, lr=1e-3, weight_decay=0.0)
        return any(not torch.equal(p, q) for p, q in zip(params, before))

    assert not moved(held)  # only held-out images have masks: nothing to fit
    assert moved(~held)
    method.cfg.text_sub_reports = 1.0  # ... and the sub-reports are drawn among the images it fits
    seen: list[torch.Tensor] = []
    sub_reports = method._sub_reports
    method._sub_reports = lambda texts, y, has: (seen.append(has.clone()), sub_reports(texts, y, has))[1]
    method.warmup(iter([batch]), 1, lr=1e-3, weight_decay=0.0)
    assert len(seen) == 1 and torch.equal(seen[0], ~held)


@pytest.mark.parametrize("holdout", [0.5, 0.0])
def test_sub_reports_skip_held_out_images_and_the_gain_is_measured_on_the_right_rows(
        holdout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gain gate measures on the held-out images when there are any, else on the images that kept their own
    report; sub-reports are drawn for the others only."""
    method, _, _ = _build("dusss", text_gate_holdout=holdout, text_sub_reports=0.5)
    batch = _batch(16, 0, True)
    batch["has_mask"] = torch.tensor([i % 4 != 3 for i in range(16)])
    held = method._gate_holdout(batch, 16)
    seen: dict[str, torch.Tensor] = {}
    sub_reports, update_gain = method._sub_reports, method._update_text_gain

    def spy_sub(texts, y, has):
        seen["sub_has"] = has.clone()
        texts, y, replaced = sub_reports(texts, y, has)
        seen["replaced"] = replaced.clone()
        return texts, y, replaced

    def spy_gain(x, z_text, y, use):
        seen["gain_rows"] = use.clone()
        return update_gain(x, z_text, y, use)

    monkeypatch.setattr(method, "_sub_reports", spy_sub)
    monkeypatch.setattr(method, "_update_text_gain", spy_gain)
    method.train()
    torch.manual_seed(1)
    method.loss(batch, None, 0, 10)
    has = batch["has_mask"]
    assert torch.equal(seen["sub_has"], has & ~held)
    replaced = seen["replaced"]
    assert not (replaced & ~seen["sub_has"]).any() and (seen["sub_has"] & ~replaced).any()  # a share of them
    if holdout > 0:
        assert held.any() and torch.equal(seen["gain_rows"], has & held)
    else:
        assert not held.any() and seen["replaced"].any()
        assert torch.equal(seen["gain_rows"], has & ~seen["replaced"])


def test_state_round_trip_restores_the_gate_and_extra_heads() -> None:
    method, _, vlm = _build("dusss")
    method.text_gain, method.text_reliability = torch.tensor(0.25), torch.tensor(0.6)
    other = build_seg_method("dusss", SegMethodConfig(), UNet(UNetConfig(base_width=8)), vlm)
    other.load_state_dict(method.state_dict())
    assert float(other.text_gain) == 0.25 and float(other.text_reliability) == pytest.approx(0.6)
    assert other.text_gate_open()
    torch.manual_seed(0)
    cct = build_seg_method("cct", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    with torch.no_grad():
        for p in cct.heads.parameters():
            p.add_(0.5)
    fresh = build_seg_method("cct", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    fresh.load_state_dict(cct.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(cct.heads.state_dict().values(), fresh.heads.state_dict().values()))


def test_state_with_a_wrong_shape_or_a_missing_key_is_refused_by_name() -> None:
    method, _, _ = _build("mt")
    state = method.state_dict()
    key = next(k for k, v in state.items() if v.ndim == 4)
    with pytest.raises(CheckpointError, match=rf"0 missing, 0 unexpected, 1 with another shape \(e.g. {key}\)"):
        method.load_state_dict({**state, key: state[key][:1]})
    with pytest.raises(CheckpointError, match=rf"1 missing, 0 unexpected, 0 with another shape \(e.g. {key}\)"):
        method.load_state_dict({k: v for k, v in state.items() if k != key})


def test_unpack_defaults_for_batches_without_flags_or_texts() -> None:
    method, _, _ = _build("mt")
    images, mask = torch.zeros(3, 3, S, S), torch.zeros(3, 1, S, S)
    x, y, has, texts = method._unpack({"image": images, "mask": mask})  # no has_mask: a mask means all have one
    assert x is images and y is mask and has.dtype == torch.bool and has.tolist() == [True] * 3
    assert texts == ["", "", ""]
    _, y, has, texts = method._unpack({"image": images, "has_mask": [1, 0, 1], "text": "one report"})
    assert y is None and has.tolist() == [False] * 3  # no mask tensor: nothing has one, whatever the flags say
    assert texts == ["one report"]
    _, _, has, _ = method._unpack({"image": images, "mask": mask, "has_mask": [[1], [0], [1]]})
    assert has.tolist() == [True, False, True]


def test_trainable_parameters_are_unique_and_include_the_text_mask_generator() -> None:
    method, student, _ = _build("dusss")
    student.inc[0].weight.requires_grad_(False)
    params = method.parameters()
    assert len({id(p) for p in params}) == len(params) and all(p.requires_grad for p in params)
    assert not any(p is student.inc[0].weight for p in params)
    assert method.text_mask in method.modules_to_train() and student in method.modules_to_train()
    assert any(p is q for p in params for q in method.text_mask.trainable_parameters())
    mt, mt_student, _ = _build("mt")
    assert mt.modules_to_train() == [mt_student]


@pytest.mark.parametrize("update", [False, True])
def test_strong_view_pass_leaves_running_stats_unless_asked(update: bool) -> None:
    """`perturb.bn_update_perturbed`: the student's pass over the strong view updates BatchNorm's running
    statistics only when set (the authors' code); by default only the clean labeled pass does."""
    method, student, _ = _build("mt", perturb=PerturbConfig(strong=True, bn_update_perturbed=update))
    method.train()
    method.loss(_batch(2, 1, True), _batch(2, 2, False), step=0, total_steps=10)
    assert int(student.inc[1].num_batches_tracked) == (2 if update else 1)


@pytest.mark.parametrize("update", [False, True])
def test_unimatch_strong_and_feature_passes_leave_running_stats_unless_asked(update: bool) -> None:
    """UniMatch: the labeled pass and the clean weak view update BatchNorm; the strong views and the feature
    stream (its perturbed passes) only with `perturb.bn_update_perturbed`."""
    method, student, _ = _build("unimatch", perturb=PerturbConfig(feature_dropout=0.5, bn_update_perturbed=update))
    method.train()
    method.loss(_batch(2, 1, True), _batch(2, 2, False), step=0, total_steps=10)
    assert int(student.inc[1].num_batches_tracked) == (4 if update else 2)


@pytest.mark.parametrize(("field", "good", "message"), [
    ("ema_buffers", "copy", "ema_buffers must be copy or ema"),
    ("teacher_norm", "running", "teacher_norm must be batch or running"),
    ("seg_loss", "bce", "seg_loss must be dice_bce or bce"),
    ("semi_loss", "dice_bce", "semi_loss must be dice_bce or bce"),
    ("consistency", "bce", "consistency must be bce, mse or dice_bce"),
    ("student_forward", "joint", "student_forward must be separate or joint"),
    ("merge", "prob", "merge must be logit or prob"),
    ("text_supervised_loss", "bce", "text_supervised_loss must be dice_bce or bce"),
    ("text_gate", "dice", "text_gate must be gain or dice"),
])
def test_config_choices_are_checked_by_name(field: str, good: str, message: str) -> None:
    assert getattr(SegMethodConfig(**{field: good}), field) == good
    with pytest.raises(ConfigError, match=f"{message}, got 'bogus'"):
        SegMethodConfig(**{field: "bogus"})


def test_config_ranges_and_feature_dropout_name_their_field() -> None:
    with pytest.raises(ConfigError, match=r"^semi\.consistency_weight must be in"):
        SegMethodConfig(consistency_weight=-1.0)
    with pytest.raises(ConfigError, match=r"^perturb\.feature_dropout needs student_forward: separate"):
        SegMethodConfig(student_forward="joint", perturb=PerturbConfig(feature_dropout=0.5))


def test_seg_method_preset_reads_the_table_then_the_class() -> None:
    from dusss.methods.segmentation import METHOD_PRESETS, seg_method_preset

    assert seg_method_preset("unimatch") == METHOD_PRESETS["unimatch"]
    assert seg_method_preset("unimatch") is not METHOD_PRESETS["unimatch"]  # a copy
    assert seg_method_preset("cct") == dict(SEG_METHODS["cct"].preset) != {}
    assert seg_method_preset("supervised") == {} and seg_method_preset("no-such-method") == {}


def test_unpack_without_a_mask_marks_every_image_of_the_batch_unlabeled() -> None:
    method, _, _ = _build("mt")
    _, y, has, _ = method._unpack({"image": torch.zeros(2, 3, S, S)})  # 2 images of 3 channels: one flag each
    assert y is None and has.tolist() == [False, False]


def test_dusss_logs_its_gain_and_text_scale_and_the_warmup_its_text_loss() -> None:
    method, _, _ = _build("dusss", tg_weight=0.0)
    logs = method.warmup(iter([_batch(4, 0, True)] * 2), 2, lr=1e-3, weight_decay=0.0)
    assert set(logs) == {"text_sup", "text_reliability"} and 0.0 < logs["text_sup"] < 10.0
    method.train()
    _, logs = method.loss(_batch(2, 1, True), _batch(2, 2, False), step=1, total_steps=4)
    assert logs["text_gain"] == pytest.approx(float(method.text_gain))
    assert logs["kappa"] == pytest.approx(float(method.text_mask.kappa.detach()))
    assert logs["beta"] == pytest.approx(float(method.text_mask.beta.detach()))


@pytest.mark.parametrize("name", ["supervised", "mt", "dusss"])
def test_to_moves_what_the_method_has_and_skips_what_it_has_not(name: str) -> None:
    method, student, _ = _build(name)
    assert method.to("cpu") is method
    assert all(p.device.type == "cpu" for p in student.parameters())


def test_text_reliability_counts_an_empty_text_mask_on_an_empty_truth_as_right() -> None:
    """The gate's running text Dice: an image without lesion whose text mask is empty scores 1 (empty_policy
    "one"), one with a lesion and an empty text mask 0, so the batch's Dice is 0.5."""
    method, _, _ = _build("dusss")
    y = torch.zeros(2, 1, S, S)
    y[1, 0, 4:12, 4:12] = 1.0
    before, m = float(method.text_reliability), method.cfg.text_gate_momentum
    method._text_supervised(torch.full((2, 1, S, S), -30.0), y, torch.tensor([True, True]))
    assert float(method.text_reliability) == pytest.approx(m * before + (1 - m) * 0.5)


@pytest.mark.parametrize("name", ["mt", "dusss"])
def test_a_step_without_an_unlabeled_batch_draws_no_strong_view(name: str) -> None:
    method, _, _ = _build(name, tg_weight=0.0, text_supervised_weight=0.0, perturb=PerturbConfig(strong=True))
    method.train()
    loss, logs = method.loss(_batch(2, 1, True), None, step=3, total_steps=10)
    assert float(loss.detach()) == pytest.approx(logs["sup"], rel=1e-6)


def test_warmup_with_the_dice_gate_holds_nothing_out_and_fits_every_labeled_image() -> None:
    method, _, _ = _build("dusss", text_gate="dice", tg_weight=0.0, text_mask_lr=1e-2)
    batch = _batch(4, 0, True)
    assert method._gate_holdout(batch, 4).tolist() == [False] * 4
    logs = method.warmup(iter([batch] * 3), 3, lr=1e-3, weight_decay=0.0)
    assert 0.0 < logs["text_sup"] < 10.0 and float(method.text_reliability) > 0.0
