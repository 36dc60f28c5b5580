"""Every registered baseline (dusss.methods.baselines) learns: a short seeded phantom run through `run_train`
must end well above the untrained network's val Dice, with no collapse at the end. One shared phantom set and
split for all of them; each baseline is one parametrized case (a new baseline module is picked up by itself).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import read_manifest
from dusss.data.splits import load_split, make_split, save_split
from dusss.data.synth import generate_phantoms
from dusss.engine.logging import read_metrics
from dusss.engine.train import load_train_config, run_train, validate
from dusss.methods.baselines import load_all
from dusss.methods.segmentation import SEG_METHODS
from dusss.models.unet import UNet, UNetConfig

pytestmark = pytest.mark.slow(seconds=60)  # about this long at one thread (tests/conftest.py runs it early)

BASELINES = sorted(name for name in SEG_METHODS if SEG_METHODS[name].__module__.startswith("dusss.methods.baselines."))
SIZE, WIDTH, EPOCHS = 48, 8, 8
# Baselines known not to pass in this short run, with the measured reason (strict: a pass is reported too).
KNOWN_SHORT = {
    # BCP's stage 1 (25 % of the 72 steps, its paper's split) leaves the teacher it is reset to untrained (val
    # Dice ~0.01), and the pasted pseudo-labels then hold the student back: best val Dice 0.10 at 8 epochs, 0.22
    # at 12, 0.24 at 16 (seed 0), against supervised 0.20 / 0.32 / - (docs/method-notes.md, "Baselines").
    "bcp": "BCP needs a longer run than this test's 72 steps (its teacher starts from a 18-step stage 1)",
    # CLIP's mask is κ·cos(decoded VLM tokens, report) + β at a quarter of the VLM's token grid: on this random
    # 48-px VLM (3×3 tokens, 8-dim embeddings) it stays empty, val Dice 0.0 at 8, 16 and 32 epochs (session 14);
    # tests/methods/baselines/test_text_supervised.py shows the network fitting a small set instead.
    "clip": "CLIP-style similarity decoder on a random 48-px VLM stays empty in this short run",
}
# Fully supervised text baselines get more epochs: at 8 epochs `supervised` itself ends at val Dice 0.20 here
# (below the bar), at 16 at 0.36; `lvit` at 16 reaches 0.73 (session 14, seed 0).
EPOCHS_FOR = {"lvit": 16}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """(manifest, split, val Dice of an untrained U-Net of the run's size)."""
    root = tmp_path_factory.mktemp("baselines")
    manifest = generate_phantoms(root / "data", n=64, size=SIZE, seed=5)
    save_split(make_split(read_manifest(manifest), labeled_fraction=0.25, seed=0), root / "splits.json")
    torch.manual_seed(0)
    records = read_manifest(manifest)
    val_keys = set(load_split(root / "splits.json", records)["val"])
    val_rows = [r for r in records if r.key in val_keys]
    loader = DataLoader(SegmentationDataset(val_rows, SIZE), batch_size=16)
    untrained = validate(UNet(UNetConfig(base_width=WIDTH)), loader, torch.device("cpu"), "fp32")["dice"]
    return manifest, root / "splits.json", float(untrained)


def test_every_baseline_module_registers_a_method() -> None:
    assert len(BASELINES) == len(load_all())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_SHORT[n]))
                                  if n in KNOWN_SHORT else n for n in BASELINES])
def test_baseline_beats_the_untrained_network(name: str, phantoms: tuple[Path, Path, float], tmp_path: Path,
                                              tiny_vlm_checkpoint) -> None:
    torch.set_num_threads(1)
    manifest, splits, untrained = phantoms
    # a method on a frozen VLM gets a random one here (no pre-training in this test)
    vlm = {"vlm": str(tiny_vlm_checkpoint(tmp_path / "vlm.safetensors", SIZE))} if SEG_METHODS[name].needs_vlm else {}
    # the method's preset (its paper's setting) under the run's sizes, as `dusss train --method NAME` gives it
    cfg = load_train_config(None, {"data": str(manifest), "splits": str(splits), "out": str(tmp_path / name),
                                   "method": name, "epochs": EPOCHS_FOR.get(name, EPOCHS), "batch_size": 4,
                                   "image_size": SIZE, "lr": 3e-3, "seed": 0, "patience": 100, "progress": False,
                                   "unet.base_width": WIDTH, **vlm})
    run_train(cfg)
    rows = read_metrics(tmp_path / name / "metrics.jsonl")
    val = [r["val/dice"] for r in rows]
    assert max(val) > untrained + 0.2, (name, untrained, val)
    assert val[-1] >= 0.8 * max(val), (name, val)  # no collapse at the end of the run
