"""The text branch localises: on held-out phantoms, the text-guided mask finds the lesions and follows the report.

A VLM (ImageNet EfficientNet-Lite0 + MiniLM, as in the demo) is pre-trained briefly (DuSSS objective) on the
phantom training images and QaTa-style reports, frozen, and the default text-mask generator is fitted on the
training masks by `DuSSSMethod.warmup` (as `dusss train` does before Step 2). On the test split (images it
never saw), `dusss.engine.text_eval.text_mask_scores` must show that the mask under the image's own report
overlaps the lesions (Dice; the unfitted generator's mask is empty) and that inside the lesions the own report
gives a clearly higher probability than "No pulmonary infection.".

Not asserted: that the report *chooses between lesions* (own report vs the mirrored mask's report, which names
the other lung). Measured here +0.01 and +0.04 on benchmarks/text_mask.py's set: the mask follows appearance,
and the report switches it on or off, but does not yet steer it between lungs (docs/benchmarks.md). Nor the
zone margin of issue 14 item 4 (`zone_scores`, printed): +0.004 here (zone gain −0.001), +0.02 to +0.05 on
benchmarks/text_mask.py's set with sub-reports (ground truth lighting exactly the described lesions: +0.056),
worst zone below 0 in both, and neither `text_mask.text_condition: film` nor `prior` raised it clearly
(docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow(seconds=90)  # about this long at one thread (tests/conftest.py runs it early)

SIZE = 64


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from dusss.data.datasets import SegmentationDataset
    from dusss.data.manifest import read_manifest
    from dusss.data.synth import generate_phantoms
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.engine.samplers import EpochSampler, epoch_batches
    from dusss.engine.text_eval import text_mask_scores, zone_scores
    from dusss.methods.segmentation import SegMethodConfig, build_seg_method
    from dusss.models.unet import UNet, UNetConfig
    from dusss.models.vlm import VisionLanguageModel, VLMConfig

    root: Path = tmp_path_factory.mktemp("grounding")
    manifest = generate_phantoms(root / "data", n=80, size=SIZE, seed=7)  # a seed no benchmark uses
    vlm_cfg = VLMConfig()
    vlm_cfg.image.kind = "efficientnet_lite0"  # the demo's VLM: ImageNet EfficientNet-Lite0 + MiniLM
    vlm_cfg.image.image_size = SIZE
    run_pretrain(PretrainConfig(data=str(manifest), out=str(root / "vlm"), epochs=3, batch_size=16, image_size=SIZE,
                                lr=1e-4, seed=0, progress=False, vlm=vlm_cfg), overwrite=True)
    records = read_manifest(manifest)
    train = [r for r in records if r.split == "train"]
    torch.manual_seed(0)
    method = build_seg_method("dusss", SegMethodConfig(), UNet(UNetConfig(base_width=4)),
                              VisionLanguageModel.from_checkpoint(root / "vlm" / "vlm.safetensors"))
    ds = SegmentationDataset(train, SIZE, augment=True, seed=0)
    batches = epoch_batches(ds, EpochSampler(len(ds), seed=0), 8, itertools.count())
    before = text_mask_scores(method.text_mask, [r for r in records if r.split == "test"], SIZE)
    method.warmup(batches, 300, lr=1e-3, weight_decay=1e-4)
    after = text_mask_scores(method.text_mask, [r for r in records if r.split == "test"], SIZE)
    zones = zone_scores(method.text_mask, [r for r in records if r.split == "test"], SIZE)
    return {"before": before, "after": after, "zones": zones}


def test_text_mask_finds_the_lesions_on_held_out_images(fitted: dict) -> None:
    before, after = fitted["before"], fitted["after"]
    print("text mask before/after fitting:", before, after, "zones after:", fitted["zones"])
    # Measured (64 px, 48 training masks, 300 steps): Dice 0.000 before, 0.117 after; own − "no infection"
    # 0.009 before, 0.115 after. The bars are half of that. (At 96 px with 20 labeled images the same generator
    # reaches 0.555 on unseen images: docs/benchmarks.md; the old BCE + L_tg defaults stay at 0.000.)
    assert before["dice"] < 0.02  # the unfitted generator's mask is empty (β = −2.5)
    assert after["n"] >= 10 and after["dice"] >= 0.06, after


def test_the_own_report_lights_the_lesions_and_no_infection_does_not(fitted: dict) -> None:
    after = fitted["after"]
    assert fitted["before"]["own_vs_none"] < 0.03
    assert after["own_vs_none"] >= 0.06, after
