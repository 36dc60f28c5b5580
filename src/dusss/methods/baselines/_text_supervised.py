"""The shared part of the text-equipped, fully supervised baselines of the DuSSS paper's Table 1: `clip`
(`clip.py`) and `lvit` (`lvit.py`).

Both train a text-conditioned network (`dusss.models.text_segmenters`) with L_sup (eq 15) on the labeled
images and their reports; they use no unlabeled images (the paper runs them on 100 % of the labels, where a
grid gives them fewer they are the text-conditioned lower bound) and **need each image's report at inference**
(`dusss predict --text`; `dusss evaluate` reads the manifest's). The DuSSS student needs no text at inference.

* `clip` (Radford et al., ICML 2021): a frozen VLM pre-trained with the CLIP objective (`dusss pretrain
  --method clip`; the harness pre-trains one per seed) and a trained dense decoder; the mask is
  κ·cos(decoded patch features, report embedding) + β (`semi.text_mask.*` configures the decoder). It trains
  at the run's lr like any supervised network, not at `semi.text_mask_lr` (MoNuSeg, seed 0, best val Dice
  27.2 % at 1e-3 against 21.7 % at the text-mask lr 1e-2: docs/benchmarks.md).
* `lvit` (Li et al., IEEE TMI 2023): LViT's U-Net (`unet.*`) with the report's frozen text embedding injected
  at every stage by FiLM (`semi.lvit.text.*` chooses the frozen encoder; all-MiniLM-L6-v2 by default).
"""

from __future__ import annotations

from dusss.methods.segmentation import SupervisedMethod


class TextSupervisedMethod(SupervisedMethod):
    """L_sup (eq 15) of a text-conditioned network on the labeled images and their reports (`SegMethod` passes
    the reports to a text-conditioned student through `dusss.models.networks.segment`)."""


__all__ = ["TextSupervisedMethod"]
