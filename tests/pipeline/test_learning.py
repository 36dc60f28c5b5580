"""Training must learn: on the phantom set a short supervised run beats the untrained network by far."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dusss.data.manifest import read_manifest
from dusss.data.splits import make_split, save_split
from dusss.data.synth import generate_phantoms
from dusss.engine.train import TrainConfig, run_train, validate
from dusss.models.unet import UNet, UNetConfig


def test_supervised_training_beats_the_untrained_network(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    manifest = generate_phantoms(tmp_path / "data", n=48, size=48, seed=3)
    split = make_split(read_manifest(manifest), labeled_fraction=1.0, seed=0)
    save_split(split, tmp_path / "splits.json")
    cfg = TrainConfig(data=str(manifest), splits=str(tmp_path / "splits.json"), out=str(tmp_path / "run"),
                      method="supervised", epochs=12, batch_size=4, image_size=48, lr=3e-3, seed=0, patience=12,
                      unet=UNetConfig(base_width=8), progress=False)
    run_train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(r["val/dice"] for r in rows)

    from torch.utils.data import DataLoader

    from dusss.data.datasets import SegmentationDataset

    val = [r for r in read_manifest(manifest) if r.split == "val"]
    torch.manual_seed(0)
    untrained = validate(UNet(UNetConfig(base_width=8)), DataLoader(SegmentationDataset(val, 48), batch_size=8),
                         torch.device("cpu"), "fp32")["dice"]
    assert best > 0.3 and best > untrained + 0.2, (best, untrained)
