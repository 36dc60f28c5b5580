"""How well a text-mask generator localises: its Dice and whether its mask follows the report.

`text_mask_scores` scores σ(z_text) of each image under its own report on rows with masks:

* `dice`: per-image Dice at p ≥ `threshold` over the lesion images (the pinned protocol's `empty_policy="skip"`,
  as the training loop's `pseudo/text_dice`);
* `own_vs_mirror`: on lesion images, the mean probability inside the lesions under the image's own report
  minus under the report of its left-right mirrored mask (the same words, the other lung where the lesions
  are unilateral): > 0 when the report chooses where the mask lights up, about 0 when the mask ignores it;
* `own_vs_none`: the same difference against "No pulmonary infection.".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dusss.data.caption import caption_mask
from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import Record
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
