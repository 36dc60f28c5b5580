"""Segmentation metrics (METHOD §5.3): per-image Dice and IoU at a threshold, HD95, and an accumulator.

Protocol (stated once, used everywhere):

* **Binarisation**: a pixel is foreground when its predicted probability is `>= threshold` (0.5), the DuSSS
  validation convention (LViT's test script uses `> 0.5`; the two differ only for probabilities of exactly
  0.5). With `from_logits=True` the probability is σ(logit). Ground truth is foreground where `> 0.5`.
* **Per image**: Dice = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G|, with no smoothing. The reported score is
  the mean over images (the paper's formula, with N = number of images, C = 1).
* **Empty ground truth** (`empty_policy`): `"skip"` (default) leaves images whose ground-truth mask is empty
  out of the Dice/IoU means (they are counted in `n_empty`); `"one"` scores them 1 when the prediction is
  empty too and 0 otherwise; `"zero"` scores them 0 (LViT's test script: 0/0 → 0).
  An image with a non-empty ground truth and an empty prediction scores 0 under every policy.
* **HD95**: the 95th percentile (numpy's linear interpolation) of the symmetric surface distances between the
  boundary pixels of P and G (boundary = foreground pixels with a 4-connected background neighbour, the image
  border counting as background, as in medpy), in units of `spacing`. NaN when P or G is empty; NaN images are
  left out of the HD95 mean and counted in `n_hd95_nan`.
* **Global Dice**: 2Σ|P∩G| / (Σ|P| + Σ|G|) over all images (a dataset-level figure, logged alongside).

Everything here is pure tensor/numpy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

EMPTY_POLICIES = ("skip", "one", "zero")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def binarize(
    pred: torch.Tensor | np.ndarray, threshold: float = 0.5, from_logits: bool = False
) -> torch.Tensor:
    """Boolean foreground mask: σ(pred) (when `from_logits`) or pred, `>= threshold`."""
    pred = _as_tensor(pred)
    if pred.dtype == torch.bool:
        return pred
    prob = torch.sigmoid(pred.float()) if from_logits else pred.float()
    return prob >= threshold


def _per_image(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to [B, P] boolean masks; a 2-D input is one image."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    return pred.flatten(1), target.flatten(1)


def _check_policy(empty_policy: str) -> None:
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"empty_policy must be one of {list(EMPTY_POLICIES)}, got {empty_policy!r}")


def _overlap_score(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    threshold: float,
    empty_policy: str,
    from_logits: bool,
    kind: str,
) -> torch.Tensor:
    _check_policy(empty_policy)
    p = binarize(pred, threshold, from_logits)
    g = _as_tensor(target)
    g = g if g.dtype == torch.bool else g.float() > 0.5
    p, g = _per_image(p, g)
    inter = (p & g).sum(1).double()
    n_p, n_g = p.sum(1).double(), g.sum(1).double()
    if kind == "dice":
        denom = n_p + n_g
        score = torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1.0), torch.zeros_like(inter))
    else:
        union = n_p + n_g - inter
        score = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    empty = n_g == 0
    if empty_policy == "skip":
        score = torch.where(empty, torch.full_like(score, math.nan), score)
    elif empty_policy == "one":
        score = torch.where(empty, (n_p == 0).double(), score)
    else:
        score = torch.where(empty, torch.zeros_like(score), score)
    return score


def dice_score(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    threshold: float = 0.5,
    empty_policy: str = "skip",
    from_logits: bool = False,
) -> torch.Tensor:
    """Per-image Dice 2|P∩G|/(|P|+|G|) `[B]` (float64); empty ground truth per `empty_policy` (skip → NaN)."""
    return _overlap_score(pred, target, threshold, empty_policy, from_logits, "dice")


def iou_score(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    threshold: float = 0.5,
    empty_policy: str = "skip",
    from_logits: bool = False,
) -> torch.Tensor:
    """Per-image IoU |P∩G|/|P∪G| `[B]` (float64); empty ground truth per `empty_policy` (skip → NaN)."""
    return _overlap_score(pred, target, threshold, empty_policy, from_logits, "iou")


def boundary(mask: torch.Tensor) -> torch.Tensor:
    """Foreground pixels with a background neighbour along some axis (4-/6-connectivity; border = background)."""
    mask = mask.bool()
    padded = F.pad(mask[None, None].to(torch.uint8), [1, 1] * mask.ndim)[0, 0].bool()
    interior = mask.clone()
    for axis in range(mask.ndim):
        interior &= _shifted(padded, axis, -1, mask.shape) & _shifted(padded, axis, 1, mask.shape)
    return mask & ~interior


def _shifted(padded: torch.Tensor, axis: int, offset: int, shape: Sequence[int]) -> torch.Tensor:
    """View of the zero-padded mask shifted by `offset` along `axis`, cropped back to `shape`."""
    out = padded
    for ax, size in enumerate(shape):
        start = 1 + (offset if ax == axis else 0)
        out = out.narrow(ax, start, size)
    return out


def hd95(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    spacing: float | Sequence[float] = 1.0,
) -> float:
    """95th-percentile symmetric Hausdorff distance between binary masks (2-D or 3-D), NaN if either is empty.

    Distances between boundary pixels, scaled by `spacing` (one value or one per axis); the percentile is
    taken over the union of both directed distance sets (medpy's definition). Each directed set is read off a
    Euclidean distance transform of the other boundary's complement (scipy.ndimage.distance_transform_edt:
    O(pixels) in 2-D and 3-D, where all boundary pairs would be O(boundary²)).
    """
    from scipy import ndimage

    p = _as_tensor(pred)
    g = _as_tensor(gt)
    p = p.bool() if p.dtype == torch.bool else p.float() > 0.5
    g = g.bool() if g.dtype == torch.bool else g.float() > 0.5
    while p.ndim > 2 and p.shape[0] == 1 and g.ndim == p.ndim and g.shape[0] == 1:  # drop batch/channel dims
        p, g = p[0], g[0]
    p, g = p.cpu(), g.cpu()
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} differ in shape")
    if not p.any() or not g.any():
        return math.nan
    sp = [float(spacing)] * p.ndim if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    if len(sp) != p.ndim:
        raise ValueError(f"spacing has {len(sp)} values for a {p.ndim}-D mask")
    edge_p, edge_g = boundary(p).numpy(), boundary(g).numpy()
    to_g = ndimage.distance_transform_edt(~edge_g, sampling=sp)[edge_p]  # each P-boundary pixel to the nearest G one
    to_p = ndimage.distance_transform_edt(~edge_p, sampling=sp)[edge_g]
    return float(np.percentile(np.concatenate([to_g, to_p]), 95))


class SegmentationMetrics:
    """Accumulates per-image Dice, IoU and HD95 over batches; `compute()` gives the means (METHOD §5.3)."""

    def __init__(
        self,
        threshold: float = 0.5,
        empty_policy: str = "skip",
        from_logits: bool = False,
        compute_hd95: bool = True,
        spacing: float | Sequence[float] = 1.0,
    ) -> None:
        _check_policy(empty_policy)
        self.threshold = threshold
        self.empty_policy = empty_policy
        self.from_logits = from_logits
        self.compute_hd95 = compute_hd95
        self.spacing = spacing
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._inter = 0
        self._sum_pred = 0
        self._sum_gt = 0

    def update(
        self,
        pred: torch.Tensor | np.ndarray,
        target: torch.Tensor | np.ndarray,
        keys: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: `pred` probabilities (or logits with `from_logits`) and `target` masks, `[B,1,H,W]`."""
        p = binarize(pred, self.threshold, self.from_logits).detach().cpu()
        g = _as_tensor(target).detach().cpu()
        g = g if g.dtype == torch.bool else g.float() > 0.5
        if p.ndim == 2:
            p, g = p[None], g[None]
        dice = dice_score(p, g, empty_policy=self.empty_policy)
        iou = iou_score(p, g, empty_policy=self.empty_policy)
        pf, gf = _per_image(p, g)
        inter, n_p, n_g = (pf & gf).sum(1), pf.sum(1), gf.sum(1)
        self._inter += int(inter.sum())
        self._sum_pred += int(n_p.sum())
        self._sum_gt += int(n_g.sum())
        if keys is not None and len(keys) != p.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {p.shape[0]} images")
        for i in range(p.shape[0]):
            self.rows.append(
                {
                    "key": keys[i] if keys is not None else str(len(self.rows)),
                    "dice": float(dice[i]),
                    "iou": float(iou[i]),
                    "hd95": hd95(p[i], g[i], self.spacing) if self.compute_hd95 else math.nan,
                    "gt_pixels": int(n_g[i]),
                    "pred_pixels": int(n_p[i]),
                    "empty_gt": bool(n_g[i] == 0),
                }
            )

    def compute(self) -> dict[str, float]:
        """Means over images: dice, iou (NaN entries skipped), hd95 (finite only), global_dice and counts."""

        def mean(name: str) -> float:
            vals = [r[name] for r in self.rows if not math.isnan(r[name])]
            return float(np.mean(vals)) if vals else math.nan

        def std(name: str) -> float:
            vals = [r[name] for r in self.rows if not math.isnan(r[name])]
            return float(np.std(vals)) if vals else math.nan

        denom = self._sum_pred + self._sum_gt
        n_hd = sum(1 for r in self.rows if not math.isnan(r["hd95"]))
        return {
            "dice": mean("dice"),
            "dice_std": std("dice"),
            "iou": mean("iou"),
            "iou_std": std("iou"),
            "hd95": mean("hd95"),
            "global_dice": 2.0 * self._inter / denom if denom > 0 else math.nan,
            "n_images": float(len(self.rows)),
            "n_scored": float(sum(1 for r in self.rows if not math.isnan(r["dice"]))),
            "n_empty": float(sum(1 for r in self.rows if r["empty_gt"])),
            "n_hd95_nan": float(len(self.rows) - n_hd) if self.compute_hd95 else float(len(self.rows)),
        }
