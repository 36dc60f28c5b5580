"""UCMT (`ucmt`): the UMIX patch scores and region moves by hand (overlap, clamped k, leftover strip, same moves
for image and label), the collaborative mean-teacher terms and the UMIX batch from an independent computation
with a teacher unlike the students, gradient routing, BatchNorm freezing of f₂, state round trip, registry,
preset and pseudo-labels."""

from __future__ import annotations

import functools

import pytest
import torch

from dusss.engine.train import load_train_config
from dusss.methods.baseline_config import UCMTConfig
from dusss.methods.baselines.ucmt import UCMTMethod, patch_grid, patch_scores, umix
from dusss.methods.perturb import PerturbConfig
from dusss.methods.segmentation import SegMethodConfig, build_seg_method
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import square_lesion_batch

S = 32


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


_batch = functools.partial(square_lesion_batch, size=S)


def _build(perturb: PerturbConfig | None = None, **uc) -> UCMTMethod:
    """ucmt with λ = 1 from the first step and a teacher clearly unlike the student."""
    torch.manual_seed(0)
    cfg = SegMethodConfig(consistency_weight=1.0, rampup_fraction=0.0, perturb=perturb or PerturbConfig(),
                          ucmt=UCMTConfig(**uc))
    method = build_seg_method("ucmt", cfg, UNet(UNetConfig(base_width=8)))
    assert isinstance(method, UCMTMethod)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method.train()


# -- UMIX by hand ----------------------------------------------------------------------------------------------
def _maps(values: dict[int, float], default: float) -> torch.Tensor:
    """A 4x4 uncertainty map [1, 1, 4, 4] of 1-pixel patches (grid 4): `values` by row-major patch index."""
    u = torch.full((16,), default)
    for i, v in values.items():
        u[i] = v
    return u.view(1, 1, 4, 4)


X = torch.arange(16.0).view(1, 1, 4, 4)  # pixel value = its patch index
U1 = (torch.arange(16.0) / 16).view(1, 1, 4, 4)  # most uncertain 15, 14; least 1, 0


def test_patch_grid_and_scores_by_hand() -> None:
    assert patch_grid(4, 4, 2) == (2, 2, 2, 2)
    assert patch_grid(5, 7, 2) == (2, 2, 2, 3)  # leftover row 4 and column 6 are outside the grid
    assert patch_grid(3, 3, 16) == (3, 3, 1, 1)  # patches of at least one pixel
    u = torch.arange(16.0).view(1, 1, 4, 4)
    # 2x2 patches: (0,1,4,5), (2,3,6,7), (8,9,12,13), (10,11,14,15)
    assert patch_scores(u, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]


def test_umix_moves_by_hand() -> None:
    u2 = _maps({3: 0.9, 7: 0.8, 12: 0.1, 13: 0.05}, 0.5)  # most uncertain 3, 7; least 12, 13
    (out,) = umix([X], U1, u2, topk=2, grid=4)
    expected = X.clone().flatten()
    expected[15], expected[14] = 12, 13  # u1's top-2 (15, 14) take u2's least uncertain (12, 13), in order
    expected[3], expected[7] = 1, 0  # u2's top-2 (3, 7) take u1's least uncertain (1, 0)
    assert out.flatten().tolist() == expected.tolist()
    assert X.flatten().tolist() == list(range(16))  # input untouched
    # each map picks its own destinations and the other's sources: one map for both moves gives another image
    (one_map,) = umix([X], U1, U1, topk=2, grid=4)
    assert one_map.flatten().tolist() != expected.tolist()


def test_umix_second_move_wins_where_both_write() -> None:
    u2 = _maps({15: 0.9, 7: 0.8, 12: 0.1, 13: 0.05}, 0.5)  # 15 is in both top-2 sets
    (out,) = umix([X], U1, u2, topk=2, grid=4)
    expected = X.clone().flatten()
    expected[14] = 13
    expected[15], expected[7] = 1, 0  # 15 ← 12 by the first move, then 15 ← 1 by the second
    assert out.flatten().tolist() == expected.tolist()
    # the order of the moves (u1's first) matters here: with the maps swapped the last write to 15 is 12
    (swapped,) = umix([X], u2, U1, topk=2, grid=4)
    assert swapped.flatten()[15] == 12 and swapped.flatten()[7] == 0 and swapped.flatten()[14] == 13


def test_umix_same_moves_for_every_tensor_and_k_clamped() -> None:
    img = torch.arange(48.0).view(1, 3, 4, 4)
    lab = (torch.arange(16.0) % 3 == 0).float().view(1, 1, 4, 4)
    u1 = torch.tensor([[[[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3]]]])
    u2 = torch.tensor([[[[0.2, 0.2, 0.8, 0.8], [0.2, 0.2, 0.8, 0.8], [0.1, 0.1, 0.6, 0.6], [0.1, 0.1, 0.6, 0.6]]]])
    # grid 2: patch scores u1 = [0.9, 0.1, 0.5, 0.3], u2 = [0.2, 0.8, 0.1, 0.6]; topk 5 → k = L // 2 = 2
    # move 1: u1's top (0, 2) ← u2's least (0, 2) (no change); move 2: u2's top (1, 3) ← u1's least (3, 1)
    out_img, out_lab = umix([img, lab], u1, u2, topk=5, grid=2)

    def patch(t: torch.Tensor, i: int) -> torch.Tensor:
        r, c = divmod(i, 2)
        return t[..., 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]

    for t, out in ((img, out_img), (lab, out_lab)):
        for dst, src in ((0, 0), (2, 2), (1, 3), (3, 1)):
            assert torch.equal(patch(out, dst), patch(t, src))
    assert not torch.equal(out_img, img)


def test_umix_leaves_the_leftover_strip_and_topk_zero_is_identity() -> None:
    g = torch.Generator().manual_seed(0)  # not the global RNG: the result must not depend on the test order
    x = torch.rand(2, 1, 5, 5, generator=g)
    # the same uncertainty under both maps: the most uncertain patch and the most certain one always differ, so
    # a patch always moves (with independent maps both moves can land a patch on itself)
    u1 = torch.rand(2, 1, 5, 5, generator=g)
    u2 = u1.clone()
    (out,) = umix([x], u1, u2, topk=1, grid=2)  # 2x2 patches on rows/cols 0-3
    assert torch.equal(out[..., 4, :], x[..., 4, :]) and torch.equal(out[..., :, 4], x[..., :, 4])
    assert not torch.equal(out, x)
    (same,) = umix([x], u1, u2, topk=0, grid=2)
    assert torch.equal(same, x)


# -- the method --------------------------------------------------------------------------------------------------
def _ell(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """½ soft Dice (smooth 1) + ½ BCE per image, mean over images, written out."""
    p = torch.sigmoid(z).flatten(1)
    t = t.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean(1)
    return (0.5 * dice + 0.5 * bce).mean()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p) + (1 - p) * torch.log(1 - p))


def _ref_umix(x: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, k: int, grid: int) -> torch.Tensor:
    """UMIX with loops: patch means, stable descending sort, two moves from the original."""
    out = x.clone()
    ph, pw = x.shape[-2] // grid, x.shape[-1] // grid
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    for b in range(x.shape[0]):
        def order(u: torch.Tensor, b: int = b) -> list[int]:
            means = [float(u[b, 0, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].mean()) for r, c in cells]
            return sorted(range(len(cells)), key=lambda i: -means[i])

        o1, o2 = order(u1), order(u2)
        for dst, src in list(zip(o1[:k], o2[-k:])) + list(zip(o2[:k], o1[-k:])):
            (rd, cd), (rs, cs) = cells[dst], cells[src]
            out[b, :, rd * ph : (rd + 1) * ph, cd * pw : (cd + 1) * pw] = \
                x[b, :, rs * ph : (rs + 1) * ph, cs * pw : (cs + 1) * pw]
    return out


def _students(method: UCMTMethod, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z1, feats = method.student(x, return_features=True)
    return z1, method.heads["decoder2"](feats.encoder)[..., : x.shape[-2], : x.shape[-1]]


def test_cmt_cps_and_umix_terms_match_an_independent_computation() -> None:
    method = _build(strong_views=False, topk=3, grid=4)  # no random views: the passes can be redone exactly
    labeled, unlabeled = _batch(2, 1, True), _batch(3, 2, False)
    _, logs = method.loss(labeled, unlabeled, step=4, total_steps=10)
    x_l, y_l, x_u = labeled["image"], labeled["mask"], unlabeled["image"]
    with torch.no_grad():  # train mode: the same batch statistics as the loss's passes
        z1_l, z2_l = _students(method, x_l)
        p_t = torch.sigmoid(method.teacher(x_u))
        y_t = (p_t >= 0.5).float()
        z1, z2 = _students(method, x_u)
        h1, h2 = (z1 >= 0).float(), (z2 >= 0).float()
        cmt = 0.5 * (_ell(z1, y_t) + _ell(z2, y_t))
        cps = 0.5 * (_ell(z1, h2) + _ell(z2, h1))
        sup = _ell(z1_l, y_l) + _ell(z2_l, y_l)
        # UMIX of the labeled batch (uncertainty against the teacher on the labeled images) ...
        p_tl = torch.sigmoid(method.teacher(x_l))
        u1_l, u2_l = _entropy((torch.sigmoid(z1_l) + p_tl) / 2), _entropy((torch.sigmoid(z2_l) + p_tl) / 2)
        xm_l, ym_l = _ref_umix(x_l, u1_l, u2_l, 3, 4), _ref_umix(y_l, u1_l, u2_l, 3, 4)
        zm1_l, zm2_l = _students(method, xm_l)
        umix_sup = _ell(zm1_l, ym_l) + _ell(zm2_l, ym_l)
        # ... and of the unlabeled batch with the teacher's hard label
        u1, u2 = _entropy((torch.sigmoid(z1) + p_t) / 2), _entropy((torch.sigmoid(z2) + p_t) / 2)
        xm, ym = _ref_umix(x_u, u1, u2, 3, 4), _ref_umix(y_t, u1, u2, 3, 4)
        zm1, zm2 = _students(method, xm)
        umix_cmt = 0.5 * (_ell(zm1, ym) + _ell(zm2, ym))
        umix_cps = 0.5 * (_ell(zm1, (zm2 >= 0).float()) + _ell(zm2, (zm1 >= 0).float()))
        # the roles swapped: each student on its own label, or on the other's instead of the teacher's
        self_training = 0.5 * (_ell(z1, h1) + _ell(z2, h2))
        no_teacher = 0.5 * (_ell(z1, h2) + _ell(z2, h2))
    assert not torch.equal(xm, x_u) and not torch.equal(ym_l, y_l)  # UMIX moved something
    assert logs["sup"] == pytest.approx(float(sup), rel=1e-5)
    assert logs["cmt"] == pytest.approx(float(cmt), rel=1e-5)
    assert logs["cps"] == pytest.approx(float(cps), rel=1e-5)
    assert logs["umix_sup"] == pytest.approx(float(umix_sup), rel=1e-5)
    assert logs["umix_cmt"] == pytest.approx(float(umix_cmt), rel=1e-5)
    assert logs["umix_cps"] == pytest.approx(float(umix_cps), rel=1e-5)
    assert logs["cps"] != pytest.approx(float(self_training), rel=1e-3)
    assert logs["cmt"] != pytest.approx(float(no_teacher), rel=1e-3)
    total = logs["sup"] + logs["cmt"] + logs["cps"] + logs["umix_sup"] + logs["umix_cmt"] + logs["umix_cps"]
    assert logs["loss"] == pytest.approx(total, rel=1e-5)


def test_gradient_reaches_both_students_and_never_the_teacher() -> None:
    method = _build()
    torch.manual_seed(2)
    loss, logs = method.loss(_batch(2, 1, False), _batch(2, 2, False))  # no masks: L_sup = 0, no labeled UMIX
    assert logs["sup"] == 0.0 and "umix_sup" not in logs and logs["cmt"] > 0 and logs["umix_cps"] > 0
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    for name, p in [("encoder", method.student.inc[0].weight), ("decoder1", method.student.outc.weight),
                    ("decoder2", method.heads["decoder2"].outc.weight),
                    ("decoder2 up4", method.heads["decoder2"].up4.conv[0][0].weight)]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_labeled_only_trains_both_decoders_on_both_batches() -> None:
    method = _build()
    torch.manual_seed(2)
    loss, logs = method.loss(_batch(2, 1, True), None)
    assert set(logs) == {"sup", "lambda", "umix_sup", "loss"}
    loss.backward()
    assert float(method.heads["decoder2"].outc.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("update", [False, True])
def test_perturbed_passes_leave_both_decoders_batchnorm_alone_unless_asked(update: bool) -> None:
    stats = []
    for unlabeled in (None, _batch(2, 2, False)):
        method = _build(perturb=PerturbConfig(bn_update_perturbed=update))
        torch.manual_seed(2)
        method.loss(_batch(2, 1, True), unlabeled)
        stats.append((method.heads["decoder2"].up1.conv[1][1].running_mean.clone(),
                      method.student.inc[1].running_mean.clone()))
    # the clean labeled pass is the same in both runs; only the (perturbed) unlabeled passes differ
    same = all(torch.allclose(a, b) for a, b in zip(*stats))
    assert same != update


def test_state_round_trip_into_a_fresh_instance() -> None:
    a = _build()
    with torch.no_grad():
        for p in a.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(5)
    b = build_seg_method("ucmt", a.cfg, UNet(UNetConfig(base_width=8))).train()
    b.student.load_state_dict(a.student.state_dict())
    labeled, unlabeled = _batch(2, 1, True), _batch(2, 2, False)

    def run(m: UCMTMethod) -> float:
        torch.manual_seed(11)  # the same photometric views
        return m.loss(labeled, unlabeled, step=3, total_steps=10)[1]["loss"]

    before = run(b)
    state = a.state_dict()
    assert any(k.startswith("heads.decoder2.") for k in state) and any(k.startswith("teacher.") for k in state)
    b.load_state_dict(state)
    ref, after = run(a), run(b)
    assert after == pytest.approx(ref, rel=1e-6) and before != pytest.approx(ref, rel=1e-6)


def test_pseudo_labels_report_both_students_and_the_teacher() -> None:
    method = _build()
    out = method.pseudo_labels(_batch(2, 3, False, size=20)["image"])
    assert set(out) == {"student", "teacher", "student2"}
    assert all(v.shape == (2, 1, 20, 20) for v in out.values())
    assert not torch.allclose(out["student2"], out["student"]) and not torch.allclose(out["teacher"], out["student"])
    assert method.student.training and method.heads.training  # modes restored


def test_registry_and_preset() -> None:
    method = build_seg_method("ucmt", SegMethodConfig(), UNet(UNetConfig(base_width=8)))
    assert isinstance(method, UCMTMethod) and method.uses_unlabeled and "decoder2" in method.heads
    cfg = load_train_config(None, {"method": "ucmt", "data": "x", "out": "y"})
    s = cfg.semi
    assert (s.consistency_weight, s.rampup_fraction, s.ema_decay) == (0.1, 0.2, 0.99)
    assert s.perturb.bn_update_perturbed is True
    assert (s.ucmt.topk, s.ucmt.grid, s.ucmt.strong_views) == (2, 16, True)
