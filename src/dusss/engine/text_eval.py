"""How well a text-mask generator localises: its Dice and whether its mask follows the report.

`text_mask_scores` scores σ(z_text) of each image under its own report on rows with masks:

* `dice`: per-image Dice at p ≥ `threshold` over the lesion images (the pinned protocol's `empty_policy="skip"`,
  as the training loop's `pseudo/text_dice`);
* `own_vs_mirror`: on lesion images, the mean probability inside the lesions under the image's own report
  minus under the report of its left-right mirrored mask (the same words, the other lung where the lesions
  are unilateral): > 0 when the report chooses where the mask lights up, about 0 when the mask ignores it;
* `own_vs_none`: the same difference against "No pulmonary infection.".

`zone_scores` asks whether the text steers *where* the mask lights up (issue 14, item 4): on every image
(lesions or not), for each zone prompt of the phantom report vocabulary ("Unilateral pulmonary infection, one
infected area, upper right lung.", the `caption_mask` report of that zone: `zone_prompts`), the mean σ(z_text)
inside the named zone of the lungs minus the mean over the rest of the lungs (`zone_margin`), with the zones
of the nominal phantom lungs (`dusss.data.synth.lung_zone_masks`). A mask that ignores the prompt does not
score 0 there: lesions are drawn per zone, not per pixel, so the small zones hold more lesion per pixel and
their margins are positive under any prompt. `zone_gain` removes that: the margin of zone z under its own
prompt minus its mean margin under the other zone prompts, exactly 0 for a mask that ignores the prompt.
Beside them: the mean lung probability under "No pulmonary infection." against the lowest of the zone
prompts' (`none_gap`).

Scale: with lesion masks as targets a zone prompt should light only the image's lesions in that zone, which
fill a small part of it. On benchmarks/text_mask.py's 57 unlabeled phantoms (96 px) the ground truth itself
scores zone margin 0.056 / zone gain 0.064 when each prompt lights exactly the lesions it describes
(`caption.described_lesions`), and 0.016 / 0 when every prompt lights all lesions. A margin far above that
means the mask lights healthy lung of the named zone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dusss.data.caption import caption_mask, described_cells, label_components
from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import Record
from dusss.data.synth import lung_zone_masks
from dusss.metrics import dice_score

NONE_PROMPT = "No pulmonary infection."


@torch.no_grad()
def text_mask_scores(generator: Any, records: list[Record], image_size: int, threshold: float = 0.5) -> dict[str, float]:
    """Dice and prompt margins (module docstring) of `generator` (a `TextMaskGenerator`) on `records`."""
    ds = SegmentationDataset([r for r in records if r.mask is not None], image_size)
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    dices: list[float] = []
    mirror: list[float] = []
    none: list[float] = []
    try:
        for i in range(len(ds)):
            item = ds[i]
            x, y, own = item["image"][None].to(device), item["mask"][None], item["text"]
            m = y[0, 0].numpy() >= 0.5
            mirrored = caption_mask(np.fliplr(m).astype(np.uint8)) if m.any() else own
            prompts = [own, mirrored, NONE_PROMPT] if m.any() else [own]
            p = torch.sigmoid(generator.text_logits(x, prompts).float()).cpu()  # [P,1,H,W]
            if m.any():  # lesion-free images are left out, as in the training loop's pseudo-label Dice
                dices.append(float(dice_score(p[:1], y, threshold=threshold)[0]))
            if m.any():
                inside = [float(pi[0][torch.from_numpy(m)].mean()) for pi in p]
                if mirrored != own:
                    mirror.append(inside[0] - inside[1])
                none.append(inside[0] - inside[2])
    finally:
        generator.train(was_training)
    nan = float("nan")
    return {"dice": float(np.mean(dices)) if dices else nan,
            "own_vs_mirror": float(np.mean(mirror)) if mirror else nan,
            "own_vs_none": float(np.mean(none)) if none else nan,
            "n": float(len(dices)), "n_mirrored": float(len(mirror))}


def zone_prompts(size: int) -> dict[tuple[str, str], tuple[str, np.ndarray]]:
    """`{(zone, side): (report, bool mask [S,S])}`: each zone of the nominal phantom lungs with the report
    `caption_mask` writes for a lesion filling it (the phantom reports' own vocabulary). A zone with no pixel
    at this size is left out (the heart leaves little of the lower left lung: 16 px at 64 px, none at 32)."""
    return {key: (caption_mask(m.astype(np.uint8)), m) for key, m in lung_zone_masks(size).items() if m.any()}


def zone_margin(prob: np.ndarray, zone: np.ndarray, lungs: np.ndarray) -> float:
    """Mean of `prob` [H,W] inside `zone` minus its mean over `lungs` outside `zone` (bool masks [H,W])."""
    zone = np.asarray(zone, dtype=bool)
    rest = np.asarray(lungs, dtype=bool) & ~zone
    if not zone.any() or not rest.any():
        raise ValueError("zone_margin needs pixels inside the zone and in the lungs outside it")
    p = np.asarray(prob, dtype=np.float64)
    return float(p[zone].mean() - p[rest].mean())


@torch.no_grad()
def zone_scores(generator: Any, records: list[Record], image_size: int) -> dict[str, float]:
    """Zone steering (module docstring) of `generator` on `records` (masks not needed):

    `zone_margin` (mean over images × zone prompts), `zone_margin_min` (the worst zone's mean), `zone_hit`
    (share of image × zone pairs with a positive margin), `zone_gain` (mean over images × zones of the margin
    under the zone's own prompt minus under the other zone prompts), `none_gap` (the lowest zone prompt's mean
    lung probability over the images minus that of "No pulmonary infection."), `none_below` (share of images
    where "No pulmonary infection." is strictly below every zone prompt; a mask that lights only described
    lesions ties on images without a lesion in some zone), `lung_mean` / `none_mean` (mean lung probability
    under the zone prompts / "No pulmonary infection.") and `margin_<zone>_<side>` per zone.
    """
    zones = zone_prompts(image_size)
    keys = list(zones)
    prompts = [zones[k][0] for k in keys] + [NONE_PROMPT]
    lungs = np.logical_or.reduce([m for _, m in zones.values()])
    ds = SegmentationDataset(list(records), image_size)
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    margins: list[np.ndarray] = []  # per image [Z prompts, Z zones]
    lung_means: list[np.ndarray] = []
    try:
        for i in range(len(ds)):
            x = ds[i]["image"][None].to(device)
            p = torch.sigmoid(generator.text_logits(x, prompts).float())[:, 0].cpu().numpy()  # [P,H,W]
            margins.append(np.array([[zone_margin(p[j], zones[k][1], lungs) for k in keys]
                                     for j in range(len(keys))]))
            lung_means.append(p[:, lungs].mean(axis=1))
    finally:
        generator.train(was_training)
    if not margins:
        nan = float("nan")
        return {"zone_margin": nan, "zone_margin_min": nan, "zone_hit": nan, "zone_gain": nan, "none_gap": nan,
                "none_below": nan, "lung_mean": nan, "none_mean": nan, "n": 0.0}
    full, means = np.stack(margins), np.asarray(lung_means)  # [I,Z,Z] (prompt, zone), [I,Z+1]
    z = len(keys)
    marg = full[:, np.arange(z), np.arange(z)]  # each zone under its own prompt, [I,Z]
    others = (full.sum(axis=1) - marg) / max(z - 1, 1)  # each zone under the other zone prompts
    gap = means[:, :-1].mean(axis=0).min() - means[:, -1].mean()
    below = (means[:, :-1].min(axis=1) > means[:, -1]).mean()
    return {"zone_margin": float(marg.mean()), "zone_margin_min": float(marg.mean(axis=0).min()),
            "zone_hit": float((marg > 0).mean()), "zone_gain": float((marg - others).mean()),
            "none_gap": float(gap), "none_below": float(below),
            "lung_mean": float(means[:, :-1].mean()), "none_mean": float(means[:, -1].mean()),
            "n": float(len(marg)),
            **{f"margin_{z}_{side}": float(m) for (z, side), m in zip(keys, marg.mean(axis=0))}}


def report_ceiling(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """What a text mask that knew the report's words exactly could add to the pseudo-label `prob` [H,W] of one
    image with true `mask` [H,W] (`described_cells`: the report says which lung zones hold lesions, not their
    outlines). Returns Dice (p ≥ `threshold`) of the pseudo-label as it is (`pseudo`), cut to the named cells
    (`cells`), and reduced to its connected components that touch a named cell (`components`); NaN on a
    lesion-free mask (the pinned protocol's `empty_policy="skip"`), where `false_positive` is 1.0 when the
    pseudo-label has foreground (0.0 when not; NaN on a lesion image) and the report ("No pulmonary
    infection.") would empty it."""
    m = np.asarray(mask) >= 0.5
    pred = np.asarray(prob) >= threshold
    cells = described_cells(m)
    labels, n = label_components(pred)
    touching = np.unique(labels[pred & cells])
    components = np.isin(labels, touching[touching > 0]) if n else np.zeros_like(pred)
    truth = torch.from_numpy(m[None, None].astype(np.float32))

    def dice(p: np.ndarray) -> float:
        return float(dice_score(torch.from_numpy(p[None, None].astype(np.float32)), truth, empty_policy="skip")[0])

    nan = float("nan")
    return {"pseudo": dice(pred), "cells": dice(pred & cells), "components": dice(components),
            "false_positive": nan if m.any() else float(pred.any())}

