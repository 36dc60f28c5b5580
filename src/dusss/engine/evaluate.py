"""Evaluation of a trained network on a manifest split (the pinned metric protocol, see README): the student
U-Net, or a text-conditioned baseline (`clip`, `lvit`), which is given the manifest's reports.

Results go to RUN/eval/<split>/ (metrics.json, per_image.csv) unless another folder is given, so that the
splits of one run keep their own results; existing results are replaced only with `overwrite`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dusss.atomic import atomic_write_text
from dusss.checkpoint import sidecar_path
from dusss.data.datasets import SegmentationDataset
from dusss.data.manifest import read_manifest
from dusss.engine.precision import resolve_device
from dusss.engine.train import load_segmentation_model
from dusss.errors import DataError
from dusss.metrics import SegmentationMetrics
from dusss.models.networks import segment
from dusss.outputs import check_outputs
from dusss.runfiles import run_file

METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"


def eval_dir(model_path: str | Path, split: str) -> Path:
    """Default results folder of `split`: RUN/eval/<split>/ beside the model (a run folder or its checkpoint)."""
    path = Path(model_path)
    return (path if path.is_dir() else path.parent) / "eval" / split


def read_eval(model_path: str | Path, split: str = "test") -> dict[str, Any] | None:
    """The metrics.json that `evaluate_run` wrote for `split` in its default folder, else None.

    Also reads the single RUN/eval/metrics.json of dusss versions that kept one result per run, if it
    records the same split.
    """
    for path in (eval_dir(model_path, split) / METRICS_FILE, eval_dir(model_path, split).parent / METRICS_FILE):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("split") == split:
            return data
    return None


def evaluate_run(model_path: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
                 device: str = "auto", empty_policy: str = "skip", batch_size: int = 16,
                 overwrite: bool = False) -> dict[str, Any]:
    """Per-image Dice / IoU / HD95 of the student on `split`; writes metrics.json and per_image.csv to `out`
    (default RUN/eval/<split>/). Existing results there are replaced only with `overwrite` (DusssError)."""
    dev = resolve_device(device)
    model, meta = load_segmentation_model(model_path, dev)
    records = [r for r in read_manifest(data) if r.split == split]
    if not records:
        raise DataError(data, f"split {split!r} has no rows")
    labeled = [r for r in records if r.mask is not None]
    if not labeled:
        raise DataError(data, f"split {split!r} has no rows with masks to evaluate against")
    out_dir = Path(out) if out else eval_dir(model_path, split)
    source = run_file(model_path)
    check_outputs([out_dir / METRICS_FILE, out_dir / PER_IMAGE_FILE],
                  inputs=[("--model", source), ("--model's sidecar", sidecar_path(source)), ("--data", data)],
                  overwrite=overwrite)
    loader = DataLoader(SegmentationDataset(labeled, int(meta["image_size"])), batch_size=batch_size, shuffle=False)
    threshold = float(meta.get("threshold", 0.5))
    metrics = SegmentationMetrics(threshold=threshold, empty_policy=empty_policy, compute_hd95=True)
    with torch.no_grad():
        for batch in loader:
            probs = torch.sigmoid(segment(model, batch["image"].to(dev), batch["text"]).float()).cpu()
            metrics.update(probs, batch["mask"], list(batch["key"]))
    summary = metrics.compute()
    result = {"split": split, "n_images": len(labeled), "image_size": int(meta["image_size"]),
              "threshold": threshold, "empty_policy": empty_policy, "model": str(model_path),
              "method": meta.get("method"), **summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = metrics.rows
    if rows:
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out_dir / PER_IMAGE_FILE, buf.getvalue())
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(result, indent=2))  # last: it describes a complete set
    return result
