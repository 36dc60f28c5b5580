"""Precision and memory options of the training loops: bf16 autocast (CPU), channels_last, gradient
accumulation, in-place torch.compile; and their CLI flags."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import dusss.engine.train as train_mod
from dusss.checkpoint import load_checkpoint
from dusss.cli import main
from dusss.config import load_config
from dusss.data.manifest import read_manifest
from dusss.data.splits import make_split, save_split
from dusss.data.synth import generate_phantoms
from dusss.engine.logging import read_metrics
from dusss.engine.precision import compile_inplace
from dusss.engine.train import TrainConfig, run_train
from dusss.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("precision_data")
    manifest = generate_phantoms(root / "data", n=24, size=32, seed=0)
    splits = save_split(make_split(read_manifest(manifest), 0.5, seed=0), root / "split.json")
    return manifest, splits  # 7 labeled, 7 unlabeled, 5 val rows


def _cfg(phantoms: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    base: dict = {"data": str(phantoms[0]), "splits": str(phantoms[1]), "out": str(out), "method": "mt",
                  "epochs": 1, "batch_size": 4, "image_size": 32, "device": "cpu", "progress": False,
                  "unet": UNetConfig(base_width=4)}
    base.update(kw)
    return TrainConfig(**base)


def test_bf16_channels_last_training_on_cpu_gives_finite_losses(phantoms: tuple[Path, Path], tmp_path: Path) -> None:
    run = run_train(_cfg(phantoms, tmp_path / "bf16", precision="bf16", channels_last=True))
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["step"] == 2
    for key in ("train/loss", "train/sup", "train/cons", "images_per_s"):
        assert math.isfinite(rows[0][key]), key
    assert 0.0 <= rows[0]["val/dice"] <= 1.0
    tensors, _ = load_checkpoint(run / "model.safetensors", "segmentation")
    assert all(t.dtype in (torch.float32, torch.int64) for t in tensors.values())  # weights stay fp32


class _GroupNormUNet(UNet):
    """The U-Net with per-sample GroupNorm instead of BatchNorm: its loss does not depend on the batching."""

    def __init__(self, cfg: UNetConfig | None = None) -> None:
        super().__init__(cfg)
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, name, nn.GroupNorm(1, child.num_features))


def test_grad_accum_2_with_batch_b_equals_batch_2b(phantoms: tuple[Path, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Mean Teacher (student + EMA teacher), 2 epochs = 2 optimizer steps each. Both runs see the same 8
    labeled and 8 unlabeled rows per step, so the updates agree up to summation order. With BatchNorm the
    batch statistics of 4 and 8 images differ, so this equality needs a batch-independent network."""
    monkeypatch.setattr(train_mod, "UNet", _GroupNormUNet)
    torch.set_num_threads(1)
    big = run_train(_cfg(phantoms, tmp_path / "b8", batch_size=8, grad_accum=1, epochs=2, augment=False))
    acc = run_train(_cfg(phantoms, tmp_path / "b4x2", batch_size=4, grad_accum=2, epochs=2, augment=False))
    rows_big, rows_acc = read_metrics(big / "metrics.jsonl"), read_metrics(acc / "metrics.jsonl")
    assert [r["step"] for r in rows_big] == [r["step"] for r in rows_acc] == [1, 2]
    for a, b in zip(rows_big, rows_acc):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    one, _ = load_checkpoint(big / "last.safetensors", "segmentation")
    two, _ = load_checkpoint(acc / "last.safetensors", "segmentation")
    init = _GroupNormUNet(UNetConfig(base_width=4)).state_dict()
    assert set(one) == set(two) == set(init)
    moved = 0.0
    for name in one:
        # 2 AdamW steps at lr 3e-4 move weights by ~6e-4; float summation order changes them by < 1e-6
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
        moved = max(moved, float((one[name] - init[name]).abs().max())) if name.endswith("weight") else moved
    assert moved > 1e-4


def test_pretraining_with_bf16_and_grad_accum(phantoms: tuple[Path, Path], tmp_path: Path) -> None:
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.models.image_encoders import ImageEncoderConfig
    from dusss.models.text_encoders import TextEncoderConfig
    from dusss.models.vlm import VLMConfig

    vlm = VLMConfig(image=ImageEncoderConfig(image_size=32, hidden_size=16, num_layers=1, num_heads=2),
                    text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2,
                                           intermediate_size=32),
                    embed_dim=8, head_hidden=16, pdt_heads=2)
    cfg = PretrainConfig(data=str(phantoms[0]), out=str(tmp_path / "pre"), epochs=1, batch_size=4, image_size=32,
                         device="cpu", precision="bf16", grad_accum=2, channels_last=True, progress=False, vlm=vlm)
    run_pretrain(cfg)
    rows = read_metrics(tmp_path / "pre" / "metrics.jsonl")
    # 14 train rows -> 3 micro-batches of 4 -> 1 optimizer step of 2 micro-batches (the third is skipped)
    assert len(rows) == 1 and rows[0]["step"] == 1
    assert math.isfinite(rows[0]["train/loss"]) and rows[0]["train/loss"] > 0


def test_compile_inplace_keeps_module_and_state_dict_keys() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    x = torch.rand(2, 3, 8, 8)
    expected = model(x)
    keys = list(model.state_dict())
    assert compile_inplace(model, False) is model
    assert compile_inplace(model, True, backend="eager") is model  # no C++ toolchain needed for "eager"
    assert list(model.state_dict()) == keys
    assert torch.allclose(model(x), expected)


def test_cli_flags_reach_the_config(phantoms: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["train", "--data", str(phantoms[0]), "--splits", str(phantoms[1]), "--out", str(out), "--method", "mt",
            "--width", "4", "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--device", "cpu",
            "--precision", "bf16", "--channels-last", "--grad-accum", "2", "--num-workers", "0", "--quiet"]
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 0, capsys.readouterr()
    cfg = load_config(TrainConfig, out / "config.yaml")
    assert (cfg.precision, cfg.channels_last, cfg.grad_accum, cfg.compile) == ("bf16", True, 2, False)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["step"] == 2  # ceil(7 / (2 x 2)) optimizer steps
