"""Evaluation of a trained student U-Net on a manifest split (the pinned metric protocol, see README)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import read_manifest
from dusss.engine.checkpoint import atomic_write_text
from dusss.engine.precision import resolve_device
from dusss.engine.train import load_segmentation_model
from dusss.errors import DataError
from dusss.metrics import SegmentationMetrics


def evaluate_run(model_path: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
                 device: str = "auto", empty_policy: str = "skip", batch_size: int = 16) -> dict[str, Any]:
    """Per-image Dice / IoU / HD95 of the student on `split`; writes eval/metrics.json and per_image.csv."""
    dev = resolve_device(device)
    model, meta = load_segmentation_model(model_path, dev)
    records = [r for r in read_manifest(data) if r.split == split]
    if not records:
        raise DataError(data, f"split {split!r} has no rows")
    labeled = [r for r in records if r.mask is not None]
    if not labeled:
        raise DataError(data, f"split {split!r} has no rows with masks to evaluate against")
    loader = DataLoader(SegmentationDataset(labeled, int(meta["image_size"])), batch_size=batch_size, shuffle=False)
    threshold = float(meta.get("threshold", 0.5))
    metrics = SegmentationMetrics(threshold=threshold, empty_policy=empty_policy, compute_hd95=True)
    with torch.no_grad():
        for batch in loader:
            probs = torch.sigmoid(model(batch["image"].to(dev)).float()).cpu()
            metrics.update(probs, batch["mask"], list(batch["key"]))
    summary = metrics.compute()
    result = {"split": split, "n_images": len(labeled), "image_size": int(meta["image_size"]),
              "threshold": threshold, "empty_policy": empty_policy, "model": str(model_path),
              "method": meta.get("method"), **summary}
    out_dir = Path(out) if out else (Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    rows = metrics.rows
    if rows:
        with open(out_dir / "per_image.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return result
