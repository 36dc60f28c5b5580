"""Metrics (METHOD §5.3) on tiny hand-checked masks: Dice, IoU, empty-mask policies, HD95, accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dusss.metrics import SegmentationMetrics, binarize, boundary, dice_score, hd95, iou_score


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(shape)
    for r, c in pixels:
        m[r, c] = 1.0
    return m


def _square(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(shape)
    m[r0:r1, c0:c1] = 1.0
    return m


GT_2x2 = _square((4, 4), 0, 2, 0, 2)  # 4 px, top-left
PRED_ROW = _square((4, 4), 0, 1, 0, 4)  # 4 px, top row; overlap 2 px


def test_dice_and_iou_hand_values() -> None:
    # Dice = 2·2/(4+4) = 0.5; IoU = 2/(4+4−2) = 1/3
    assert dice_score(PRED_ROW[None], GT_2x2[None]).item() == pytest.approx(0.5)
    assert iou_score(PRED_ROW[None], GT_2x2[None]).item() == pytest.approx(1 / 3)
    assert dice_score(GT_2x2, GT_2x2).item() == 1.0  # a 2-D input is one image


def test_threshold_is_inclusive_and_logits_supported() -> None:
    prob = GT_2x2 * 0.5  # exactly 0.5 on the square: foreground (>= 0.5)
    assert dice_score(prob[None], GT_2x2[None]).item() == 1.0
    just_below = GT_2x2 * 0.4999
    assert dice_score(just_below[None], GT_2x2[None], empty_policy="zero").item() == 0.0
    logits = torch.where(GT_2x2 > 0, 0.0, -5.0)  # σ(0) = 0.5 → foreground
    assert dice_score(logits[None], GT_2x2[None], from_logits=True).item() == 1.0


@pytest.mark.parametrize(
    ("policy", "both_empty", "gt_empty_pred_not"),
    [("skip", math.nan, math.nan), ("one", 1.0, 0.0), ("zero", 0.0, 0.0)],
)
def test_empty_policies(policy: str, both_empty: float, gt_empty_pred_not: float) -> None:
    empty = torch.zeros(4, 4)
    pred = torch.stack([empty, PRED_ROW, empty])
    gt = torch.stack([empty, empty, GT_2x2])
    for fn in (dice_score, iou_score):
        scores = fn(pred, gt, empty_policy=policy)
        for got, want in zip(scores.tolist(), [both_empty, gt_empty_pred_not, 0.0]):
            assert (math.isnan(got) and math.isnan(want)) or got == want


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError):
        dice_score(GT_2x2, GT_2x2, empty_policy="ignore")


def test_boundary_pixels() -> None:
    sq = _square((5, 5), 1, 4, 1, 4)  # 3×3: 8 boundary pixels, centre is interior
    b = boundary(sq.bool())
    assert b.sum().item() == 8 and not b[2, 2]
    full = torch.ones(4, 4, dtype=torch.bool)  # image border counts as background
    assert boundary(full).sum().item() == 12


def test_hd95_percentile_hand_value() -> None:
    # pred = {(2,0)}, gt = {(2,0), (2,10)}: distances pred→gt [0], gt→pred [0, 10];
    # 95th percentile of [0, 0, 10] (linear): rank 0.95·2 = 1.9 → 0 + 0.9·10 = 9
    pred = _mask((5, 12), (2, 0))
    gt = _mask((5, 12), (2, 0), (2, 10))
    assert hd95(pred, gt) == pytest.approx(9.0)
    assert hd95(gt, pred) == pytest.approx(9.0)  # symmetric
    assert hd95(pred.numpy(), gt.numpy()) == pytest.approx(9.0)


def test_hd95_shifted_squares_and_spacing() -> None:
    # 3×3 squares at columns 1-3 and 4-6: boundary distances {1×6, 2×4, 3×6} → p95 = 3
    a = _square((7, 8), 1, 4, 1, 4)
    b = _square((7, 8), 1, 4, 4, 7)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=0.5) == pytest.approx(1.5)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(3.0)  # rows do not matter
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    assert hd95(a, a) == 0.0


def test_hd95_empty_is_nan() -> None:
    assert math.isnan(hd95(torch.zeros(4, 4), GT_2x2))
    assert math.isnan(hd95(GT_2x2, torch.zeros(4, 4)))
    assert math.isnan(hd95(torch.zeros(4, 4), torch.zeros(4, 4)))


def test_accumulator_means_global_dice_and_rows() -> None:
    m = SegmentationMetrics()
    empty = torch.zeros(4, 4)
    # image a: Dice 0.5, IoU 1/3; image b: empty/empty (skipped); image c: perfect
    m.update(torch.stack([PRED_ROW, empty])[:, None], torch.stack([GT_2x2, empty])[:, None], keys=["a", "b"])
    m.update(GT_2x2[None, None], GT_2x2[None, None], keys=["c"])
    out = m.compute()
    assert out["dice"] == pytest.approx(0.75)
    assert out["iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["global_dice"] == pytest.approx(2 * (2 + 0 + 4) / (8 + 0 + 8))
    assert out["n_images"] == 3 and out["n_scored"] == 2 and out["n_empty"] == 1
    # HD95 of a: distances [0,0,1,2] ∪ [0,0,1,1] → sorted [0,0,0,0,1,1,1,2], rank 6.65 → 1.65; c: 0; b: NaN
    assert [r["key"] for r in m.rows] == ["a", "b", "c"]
    assert m.rows[0]["hd95"] == pytest.approx(1.65)
    assert math.isnan(m.rows[1]["hd95"])
    assert out["hd95"] == pytest.approx(0.825)
    assert out["n_hd95_nan"] == 1
    assert m.rows[0]["gt_pixels"] == 4 and m.rows[0]["pred_pixels"] == 4 and m.rows[1]["empty_gt"]
    ref = np.percentile([0, 0, 1, 2, 0, 0, 1, 1], 95)
    assert m.rows[0]["hd95"] == pytest.approx(ref)


def test_accumulator_policy_one_and_logits() -> None:
    m = SegmentationMetrics(empty_policy="one", from_logits=True, compute_hd95=False)
    logits = torch.full((2, 1, 4, 4), -4.0)
    logits[0, 0, :2, :2] = 4.0
    gt = torch.zeros(2, 1, 4, 4)
    gt[0, 0, :2, :2] = 1.0
    m.update(logits, gt)
    out = m.compute()
    assert out["dice"] == 1.0 and out["n_scored"] == 2 and out["n_empty"] == 1
    assert math.isnan(out["hd95"])


# -- boundary cases of every policy, and an independent reference -----------------------------------------------


@pytest.mark.parametrize(("policy", "one_px_pred", "empty_pred"), [("skip", math.nan, math.nan), ("one", 0.0, 1.0),
                                                                    ("zero", 0.0, 0.0)])
def test_one_pixel_prediction_is_not_empty(policy: str, one_px_pred: float, empty_pred: float) -> None:
    """Empty truth: a 1-pixel prediction is a false positive (0 under `one`), an empty one is right."""
    empty = torch.zeros(4, 4)
    one = torch.zeros(4, 4)
    one[2, 3] = 1.0
    for fn in (dice_score, iou_score):
        got = fn(torch.stack([one, empty]), torch.stack([empty, empty]), empty_policy=policy).tolist()
        for g, w in zip(got, [one_px_pred, empty_pred]):
            assert (math.isnan(g) and math.isnan(w)) or g == w, (fn.__name__, policy, got)


def test_one_pixel_truth_hand_values() -> None:
    gt = torch.zeros(4, 4)
    gt[0, 0] = 1.0
    hit, miss, wide = gt.clone(), torch.zeros(4, 4), torch.zeros(4, 4)
    miss[3, 3] = 1.0
    wide[0, :2] = 1.0  # the pixel and its neighbour
    d = dice_score(torch.stack([hit, miss, wide, torch.zeros(4, 4)]), gt.expand(4, 4, 4), empty_policy="one")
    torch.testing.assert_close(d, torch.tensor([1.0, 0.0, 2 / 3, 0.0], dtype=torch.float64))
    i = iou_score(wide[None], gt[None])
    assert i.item() == pytest.approx(0.5)
    assert hd95(hit, gt) == 0.0 and hd95(miss, gt) == pytest.approx(math.sqrt(18))


def _reference(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """Dice, IoU and HD95 written independently: set sizes, scipy's erosion for the boundary and every pairwise
    distance between the boundaries (brute force; `hd95` uses a distance transform)."""
    from scipy import ndimage

    inter, n_p, n_g = float((pred & gt).sum()), float(pred.sum()), float(gt.sum())
    dice = 2 * inter / (n_p + n_g)
    iou = inter / (n_p + n_g - inter)
    def edge(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    ep, eg = np.argwhere(edge(pred)).astype(float), np.argwhere(edge(gt)).astype(float)
    pairwise = np.sqrt(((ep[:, None, :] - eg[None, :, :]) ** 2).sum(-1))
    d_to_g, d_to_p = pairwise.min(axis=1), pairwise.min(axis=0)
    return dice, iou, float(np.percentile(np.concatenate([d_to_g, d_to_p]), 95))


def test_metrics_match_an_independent_reference_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for _ in range(25):
        pred = ndimage.binary_dilation(rng.random((24, 20)) < 0.03, iterations=int(rng.integers(0, 3)))
        gt = ndimage.binary_dilation(rng.random((24, 20)) < 0.03, iterations=int(rng.integers(0, 3)))
        if not pred.any() or not gt.any():
            continue
        dice, iou, h = _reference(pred, gt)
        p, g = torch.from_numpy(pred)[None].float(), torch.from_numpy(gt)[None].float()
        assert dice_score(p, g).item() == pytest.approx(dice, abs=1e-12)
        assert iou_score(p, g).item() == pytest.approx(iou, abs=1e-12)
        assert hd95(pred, gt) == pytest.approx(h, abs=1e-9)


# -- killing the surviving mutants of tools/mutation.py (docs/mutation.md) -------------------------------------


def test_binarize_defaults_are_probability_at_one_half_and_accept_grad() -> None:
    x = torch.tensor([0.3, 0.5, 0.7], requires_grad=True)  # a model output: binarize must not go via numpy
    assert binarize(x).tolist() == [False, True, True]  # threshold 0.5, not logits (σ(0.3) = 0.57 would be True)
    assert binarize(x, from_logits=True).tolist() == [True, True, True]  # σ(0.3), σ(0.5), σ(0.7) all > 0.5


def test_soft_truth_of_exactly_one_half_is_background() -> None:
    gt = GT_2x2 * 0.5
    gt[0, 0] = gt[0, 1] = 1.0  # 2 px at 1.0 (foreground), 2 px at 0.5 (background: truth is `> 0.5`)
    # Dice = 2·2/(4+2) = 2/3, IoU = 2/4
    assert dice_score(GT_2x2[None], gt[None]).item() == pytest.approx(2 / 3)
    assert iou_score(GT_2x2[None], gt[None]).item() == pytest.approx(0.5)
    m = SegmentationMetrics(compute_hd95=False)
    m.update(GT_2x2[None, None], gt[None, None])
    assert m.rows[0]["gt_pixels"] == 2 and m.compute()["dice"] == pytest.approx(2 / 3)


def test_iou_of_identical_one_pixel_masks_is_one_and_iou_takes_logits() -> None:
    one = _mask((4, 4), (1, 2))
    assert iou_score(one[None], one[None]).item() == 1.0  # union 1, intersection 1
    logits = torch.where(GT_2x2 > 0, 0.2, -0.2)  # σ(0.2) = 0.55 → foreground; the raw 0.2 would not be
    assert iou_score(logits[None], GT_2x2[None], from_logits=True).item() == 1.0


def test_boundary_is_face_connected_in_3d() -> None:
    cross = torch.zeros(5, 5, 5, dtype=torch.bool)  # centre voxel and its 6 face neighbours
    cross[2, 2, 2] = True
    for axis in range(3):
        for d in (-1, 1):
            idx = [2, 2, 2]
            idx[axis] += d
            cross[tuple(idx)] = True
    b = boundary(cross)
    assert int(b.sum()) == 6 and not bool(b[2, 2, 2])  # the centre has all 6 face neighbours: interior


def test_hd95_in_3d_with_anisotropic_spacing() -> None:
    a = torch.zeros(5, 6, 7, dtype=torch.bool)
    a[1:4, 1:4, 1:4] = True
    b = torch.roll(a, 2, dims=2)  # the cube moved 2 voxels along the last axis
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 0.5)) == pytest.approx(1.0)
    assert hd95(a, b, spacing=(3.0, 3.0, 1.0)) == pytest.approx(2.0)  # only the shifted axis matters


def test_hd95_drops_singleton_batch_dims_and_thresholds_soft_masks() -> None:
    solid = _square((7, 7), 1, 6, 1, 6)  # a filled 5×5 square and its hollow outline share one boundary
    hollow = solid.clone()
    hollow[2:5, 2:5] = 0.0
    assert hd95(solid, hollow) == 0.0
    # [1,1,H,W] must be read as the 2-D image; as a 3-D [1,H,W] volume every pixel would be boundary (→ 1.0)
    assert hd95(solid[None, None], hollow[None, None]) == 0.0
    # soft masks are thresholded at > 0.5: 0.3 everywhere else is background
    assert hd95(solid + 0.3 * (1 - solid), hollow + 0.3 * (1 - hollow)) == 0.0


def test_hd95_on_a_volume_uses_every_slice_and_per_axis_spacing() -> None:
    p = torch.zeros(2, 3, 3, dtype=torch.bool)
    g = torch.zeros(2, 3, 3, dtype=torch.bool)
    p[0, 1, 1] = p[1, 1, 1] = True
    g[0, 1, 1] = True
    # distances p→g [0, 1], g→p [0]: sorted [0, 0, 1], rank 0.95·2 = 1.9 → 0.9; slice spacing 2 → 1.8
    assert hd95(p, g) == pytest.approx(0.9)
    assert hd95(p, g, spacing=(2.0, 1.0, 1.0)) == pytest.approx(1.8)


def test_accumulator_2d_input_default_keys_std_spacing_and_grad() -> None:
    m = SegmentationMetrics(spacing=2.0)
    pred = PRED_ROW.clone().requires_grad_(True)
    m.update(pred, GT_2x2)  # a 2-D input is one image
    m.update(GT_2x2[None, None], GT_2x2[None, None])
    out = m.compute()
    assert [r["key"] for r in m.rows] == ["0", "1"] and out["n_images"] == 2
    assert m.rows[0]["hd95"] == pytest.approx(2 * 1.65)  # the hand value above, in units of spacing 2
    assert out["dice"] == pytest.approx(0.75) and out["dice_std"] == pytest.approx(0.25)  # Dice 0.5 and 1
    assert out["iou_std"] == pytest.approx((1 - 1 / 3) / 2)  # IoU 1/3 and 1


def test_accumulator_logits_near_zero_and_policy_one_iou() -> None:
    m = SegmentationMetrics(empty_policy="one", from_logits=True, compute_hd95=False)
    logits = torch.full((2, 1, 4, 4), -0.2)  # σ(−0.2) = 0.45: background
    logits[0, 0, :2, :2] = 0.2  # σ(0.2) = 0.55: foreground, though the raw value is < 0.5
    gt = torch.zeros(2, 1, 4, 4)
    gt[0, 0, :2, :2] = 1.0
    m.update(logits, gt)
    out = m.compute()
    assert out["dice"] == 1.0 and out["iou"] == 1.0  # image 2: empty truth, empty prediction → 1 under `one`
    assert out["dice_std"] == 0.0 and out["iou_std"] == 0.0


def test_accumulator_global_dice_edge_cases() -> None:
    m = SegmentationMetrics(compute_hd95=False)
    m.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert math.isnan(m.compute()["global_dice"])  # nothing predicted, nothing true: 0/0
    m.update(_mask((4, 4), (0, 0))[None, None], torch.zeros(1, 1, 4, 4))
    assert m.compute()["global_dice"] == 0.0  # 2·0/(1+0)
    assert math.isnan(m.compute()["dice_std"])  # both images skipped: no Dice to spread


@pytest.mark.parametrize(("policy", "empty_hit", "empty_miss"), [("one", 1.0, 0.0), ("zero", 0.0, 0.0)])
def test_the_accumulator_applies_its_empty_policy_to_iou_as_to_dice(policy: str, empty_hit: float,
                                                                    empty_miss: float) -> None:
    """Images with an empty ground truth: an empty prediction scores `empty_hit`, any foreground `empty_miss`,
    in the IoU column as in the Dice column; a lesion image (IoU 1/2, Dice 2/3) is scored as usual."""
    gt = torch.zeros(3, 1, 4, 4)
    gt[2, 0, 0, :2] = 1.0  # image 2: two lesion pixels
    pred = torch.zeros(3, 1, 4, 4)
    pred[1, 0, 3, 3] = 1.0  # image 1: a false positive on an empty image
    pred[2, 0, 0, :4] = 1.0  # image 2: four pixels, two of them right
    m = SegmentationMetrics(empty_policy=policy, compute_hd95=False)
    m.update(pred, gt, ["empty-hit", "empty-miss", "lesion"])
    assert [r["iou"] for r in m.rows] == [empty_hit, empty_miss, pytest.approx(0.5)]
    assert [r["dice"] for r in m.rows] == [empty_hit, empty_miss, pytest.approx(2 / 3)]
    out = m.compute()
    assert out["iou"] == pytest.approx((empty_hit + empty_miss + 0.5) / 3)
    assert out["n_empty"] == 2.0 and out["n_scored"] == 3.0
