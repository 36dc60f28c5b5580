from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dusss.data.datasets import PretrainDataset, SegmentationDataset
from dusss.data.manifest import read_manifest
from dusss.errors import ConfigError, DataError

from .builders import box_mask, gradient, write_csv, write_png

TEXT = "Unilateral pulmonary infection, one infected area, upper left lung."


def test_segmentation_items(tiny_manifest: Path) -> None:
    ds = SegmentationDataset(read_manifest(tiny_manifest), image_size=8)
    assert len(ds) == 5
    item = ds[0]
    assert set(item) == {"image", "mask", "has_mask", "text", "key"}
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 8, 8) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0} and item["has_mask"] is True
    assert item["key"] == "images/a.png" and item["text"] == TEXT
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    unl = ds[2]
    assert unl["has_mask"] is False and float(unl["mask"].abs().sum()) == 0.0


def test_cache_decodes_once(tiny_manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dusss.data.datasets as mod

    calls: list[Path] = []
    real = mod.read_image
    monkeypatch.setattr(mod, "read_image", lambda p: calls.append(p) or real(p))
    ds = SegmentationDataset(read_manifest(tiny_manifest), image_size=8)
    ds[0], ds[0], ds[1]
    assert len(calls) == 2
    ds.preload()
    assert len(calls) == 5


def test_batches_collate(tiny_manifest: Path) -> None:
    ds = SegmentationDataset(read_manifest(tiny_manifest), image_size=8, augment=True)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["mask"].shape == (3, 1, 8, 8)
    assert batch["has_mask"].tolist() == [True, True, False] and len(batch["text"]) == 3


def _lateral_dataset(root: Path) -> list:
    """One image with a lesion on the image right (patient's left) and a text saying so."""
    mask = box_mask(32, 32, (4, 12, 22, 30))
    write_png(root / "i.png", (gradient(32, 32) // 2 + mask * 100).astype(np.uint8))
    write_png(root / "m.png", mask * 255)
    write_png(root / "v.png", gradient(32, 32))
    rows = [["i.png", "m.png", TEXT, "train", "a"], ["v.png", "m.png", "x", "val", "b"]]
    return read_manifest(write_csv(root / "m.csv", rows))


def test_augmentation_is_seeded_per_epoch_and_follows_laterality(tmp_path: Path) -> None:
    recs = _lateral_dataset(tmp_path)
    ds = SegmentationDataset(recs, image_size=32, augment=True, seed=0)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        a, b = ds[0], ds[0]
        assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]
        cols = a["mask"][0].nonzero()[:, 1].float().mean().item()
        on_image_right = cols > 15.5
        assert ("left lung" in a["text"]) == on_image_right, (epoch, a["text"])
        seen.add(on_image_right)
    assert seen == {True, False}
    other = SegmentationDataset(recs, image_size=32, augment=True, seed=1)
    differs = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        other.set_epoch(epoch)
        differs.append(not torch.equal(ds[0]["image"], other[0]["image"]))
    assert any(differs)
    plain = SegmentationDataset(recs, image_size=32)
    assert plain[0]["text"] == TEXT


def test_pretrain_items(tmp_path: Path) -> None:
    recs = _lateral_dataset(tmp_path)
    ds = PretrainDataset(recs, image_size=16, seed=0)
    item = ds[0]
    assert set(item) == {"image", "image_aug", "text", "text_aug", "key"}
    assert item["image"].shape == item["image_aug"].shape == (3, 16, 16)
    texts = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        it = ds[0]
        assert it["text"] in (TEXT, TEXT.replace("left", "right"))
        texts.add(it["text_aug"])
    assert len(texts) > 2
    flat = PretrainDataset(recs, image_size=16, text_aug=False, augment=False)[0]
    assert torch.equal(flat["image"], flat["image_aug"]) and flat["text"] == flat["text_aug"] == TEXT


def test_pretrain_needs_texts_and_sizes_must_match(tmp_path: Path) -> None:
    write_png(tmp_path / "i.png", gradient(8, 8))
    write_png(tmp_path / "m.png", box_mask(6, 8, (0, 2, 0, 2)) * 255)
    recs = read_manifest(write_csv(tmp_path / "m.csv", [["i.png", "m.png", "", "train", "a"]]))
    with pytest.raises(DataError, match="row 2: text is empty"):
        PretrainDataset(recs, image_size=8)
    with pytest.raises(DataError, match="mask size 6x8 differs from the image size 8x8"):
        SegmentationDataset(recs, image_size=8)[0]
    with pytest.raises(ConfigError, match="image_size"):
        SegmentationDataset(recs, image_size=0)
    with pytest.raises(ConfigError, match="policy"):
        SegmentationDataset(recs, image_size=8, policy="random")
