"""Learning tests with verdicts for the semi-supervised core (phantom set, seeded, CPU).

1. Mean Teacher at consistency weight 0 is `supervised` plus an unlabeled pass that carries no loss: its labeled
   loss must follow `supervised`'s to the last digit and its val Dice must track it, epoch by epoch. Before the
   fix (one joint labeled + unlabeled pass through BatchNorm) the labeled loss drifted below supervised's and
   the eval-mode val Dice collapsed (docs/method-notes.md, "Mean-Teacher collapse").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dusss.data.manifest import read_manifest
from dusss.data.splits import make_split, save_split
from dusss.data.synth import generate_phantoms
from dusss.engine.logging import read_metrics
from dusss.engine.train import TrainConfig, run_train
from dusss.methods.segmentation import SegMethodConfig
from dusss.models.unet import UNetConfig

pytestmark = pytest.mark.slow(seconds=30)  # about this long at one thread (tests/conftest.py runs it early)


@pytest.fixture(scope="module")
def phantom_25(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ssl")
    manifest = generate_phantoms(root / "data", n=64, size=48, seed=5)
    save_split(make_split(read_manifest(manifest), labeled_fraction=0.25, seed=0), root / "splits.json")
    return manifest, root / "splits.json"


def _train(data: tuple[Path, Path], out: Path, method: str, epochs: int, **semi) -> list[dict]:
    manifest, splits = data
    cfg = TrainConfig(data=str(manifest), splits=str(splits), out=str(out), method=method, epochs=epochs,
                      batch_size=4, image_size=48, lr=3e-3, seed=0, patience=epochs, progress=False,
                      unet=UNetConfig(base_width=8), semi=SegMethodConfig(**semi))
    run_train(cfg)
    return read_metrics(out / "metrics.jsonl")


def test_mean_teacher_at_weight_zero_trains_like_supervised(phantom_25: tuple[Path, Path], tmp_path: Path) -> None:
    torch.set_num_threads(1)  # exact loss equality below; and 2 threads beside another pytest worker thrash
    epochs = 10
    sup = _train(phantom_25, tmp_path / "sup", "supervised", epochs)
    mt = _train(phantom_25, tmp_path / "mt", "mt", epochs, consistency_weight=0.0, ema_decay=0.95)
    assert [r["step"] for r in sup] == [r["step"] for r in mt]  # the same optimizer steps
    for a, b in zip(sup, mt):
        # same labeled batches, same weights: the labeled loss is identical (train-mode BN sees labeled images only)
        assert b["train/sup"] == pytest.approx(a["train/sup"], rel=1e-5), (a["epoch"], a["train/sup"], b["train/sup"])
    # Eval mode differs only by the BatchNorm running statistics, which mt updates twice a step (labeled and
    # unlabeled pass, both clean images), so they settle sooner; it must not fall behind, nor collapse.
    sup_val, mt_val = [r["val/dice"] for r in sup], [r["val/dice"] for r in mt]
    assert mt_val[-1] >= sup_val[-1] - 0.05, (sup_val, mt_val)
    assert max(mt_val) > 0.2 and mt_val[-1] >= 0.9 * max(mt_val), mt_val
