"""Check a whole manifest up front and name every file with a problem (nnU-Net's verify_dataset_integrity).

Checks per row: image and mask exist and decode, equal sizes, binary mask, non-empty text, valid split,
no duplicate row or image key; val/test rows need a mask (they are scored). Checks overall: train, val
and test are each non-empty, at least one train row is labeled, and no case_id has rows in two splits
(patient leakage: one line per such case, naming its splits and first rows).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dusss.data.manifest import (
    SPLITS,
    cases_across_splits,
    leak_message,
    read_table,
    resolve_path,
    row_problem,
)
from dusss.data.readers import read_image, read_mask
from dusss.errors import DataError


@dataclass
class VerifyReport:
    """`problems`: one line per problem, naming the file; `summary`: counts and image sizes."""

    problems: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _decode(fn: Any, path: Path, row_no: int, problems: list[str]) -> np.ndarray | None:
    try:
        return fn(path)
    except DataError as exc:
        problems.append(f"{exc} (row {row_no})")
        return None


def verify_manifest(path: str | Path) -> VerifyReport:
    """Check every row of the manifest at `path`; never raises for bad data, reports it instead."""
    p = Path(path)
    report = VerifyReport()
    try:
        table = read_table(p)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    problems = report.problems
    folder = p.parent
    seen_keys: dict[str, int] = {}
    seen_rows: dict[tuple[str, ...], int] = {}
    splits: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    labeled = Counter()
    case_rows: list[tuple[str, str, int]] = []
    for row_no, values in table:
        where = f"{p}: row {row_no}"
        full = tuple(values[c] for c in ("image", "mask", "text", "split", "case_id"))
        if full in seen_rows:
            problems.append(f"{where}: duplicate row (same as row {seen_rows[full]})")
            continue
        seen_rows[full] = row_no
        problem = row_problem(values)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        key = values["image"]
        if key in seen_keys:
            problems.append(f"{where}: image {key!r} already listed in row {seen_keys[key]}")
            continue
        seen_keys[key] = row_no
        split = values["split"]
        case_rows.append((values["case_id"] or key, split, row_no))
        splits[split] += 1
        if not values["text"]:
            problems.append(f"{where}: text is empty")
        image = _decode(read_image, resolve_path(folder, key), row_no, problems)
        if image is not None:
            sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
        if not values["mask"]:
            labeled["unlabeled"] += 1
            if split != "train":
                problems.append(f"{where}: {split} rows need a mask (they are scored)")
            continue
        labeled["labeled"] += 1
        if split == "train":
            labeled["train_labeled"] += 1
        mask_path = resolve_path(folder, values["mask"])
        mask = _decode(read_mask, mask_path, row_no, problems)
        if image is not None and mask is not None and mask.shape != image.shape[:2]:
            problems.append(
                f"{mask_path}: mask size {mask.shape[0]}x{mask.shape[1]} differs from the image size "
                f"{image.shape[0]}x{image.shape[1]} (row {row_no})"
            )
    for case, rows_by_split in cases_across_splits(case_rows).items():
        problems.append(f"{p}: {leak_message(case, rows_by_split)}")
    for split in SPLITS:
        if splits[split] == 0:
            problems.append(f"{p}: split '{split}' has no rows")
    if splits["train"] and not labeled["train_labeled"]:
        problems.append(f"{p}: no train row has a mask (at least one labeled image is needed)")
    report.summary = {
        "manifest": str(p),
        "rows": sum(splits.values()),
        "splits": {s: splits[s] for s in SPLITS},
        "labeled": labeled["labeled"],
        "unlabeled": labeled["unlabeled"],
        "image_sizes": dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    return report


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary lines of a VerifyReport."""
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    sizes = ", ".join(f"{k} ({v})" for k, v in summary["image_sizes"].items()) or "none"
    return "\n".join(
        [
            f"manifest: {summary['manifest']}",
            f"rows: {summary['rows']} ({splits})",
            f"labeled: {summary['labeled']}, unlabeled: {summary['unlabeled']}",
            f"image sizes: {sizes}",
        ]
    )
