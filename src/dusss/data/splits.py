"""Labeled/unlabeled partitions of the train split, grouped by case_id, saved as JSON (nnU-Net style).

A case (case_id) belongs to one side only: `make_split` refuses a manifest with a case in two of
train/val/test, and `load_split` a split file with a case in two of train (labeled + unlabeled)/val/test
(patient leakage). `make_split` draws round(fraction x number of train cases) cases (at least one) among the train cases
that have at least one mask; their masked rows are `labeled`, every other train row is `unlabeled`
(its mask, if any, is never used). Cases are sorted by case_id before a seeded permutation, so the
split depends only on the manifest's content, the fraction and the seed. `val`/`test` are the
manifest's own rows. A split file lists `Record.key`s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dusss.atomic import atomic_write_text
from dusss.data.manifest import Record, refuse_leaks
from dusss.errors import ConfigError, DataError
from dusss.outputs import Inputs, check_outputs

LISTS: tuple[str, ...] = ("labeled", "unlabeled", "val", "test")


def make_split(
    records: Sequence[Record], labeled_fraction: float, seed: int = 0, source: str | Path | None = None
) -> dict[str, Any]:
    """Deterministic labeled/unlabeled partition of the train rows; `source` names the manifest in errors."""
    f = labeled_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0) or math.isnan(f):
        raise ConfigError(f"labeled fraction must be in (0, 1], got {labeled_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    by_split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
    for s, rows in by_split.items():
        if not rows:
            raise DataError(source, f"the manifest has no {s} rows (train, val and test are all needed)")
    refuse_leaks(records, source)
    cases: dict[str, list[Record]] = {}
    for r in by_split["train"]:
        cases.setdefault(r.case_id, []).append(r)
    eligible = sorted(c for c, rows in cases.items() if any(r.labeled for r in rows))
    if not eligible:
        raise DataError(source, "no train row has a mask, so nothing can be labeled")
    n_labeled = max(1, math.floor(f * len(cases) + 0.5))
    if n_labeled > len(eligible):
        raise ConfigError(
            f"labeled fraction {f} asks for {n_labeled} of {len(cases)} train cases, "
            f"but only {len(eligible)} have masks"
        )
    order = np.random.default_rng(seed).permutation(len(eligible))
    chosen = {eligible[i] for i in order[:n_labeled].tolist()}
    labeled = [r.key for r in by_split["train"] if r.case_id in chosen and r.labeled]
    unlabeled = [r.key for r in by_split["train"] if not (r.case_id in chosen and r.labeled)]
    return {
        "labeled": labeled,
        "unlabeled": unlabeled,
        "val": [r.key for r in by_split["val"]],
        "test": [r.key for r in by_split["test"]],
        "labeled_fraction": float(f),
        "seed": int(seed),
    }


def save_split(split: dict[str, Any], path: str | Path, inputs: Inputs = (), overwrite: bool = False) -> Path:
    """Write a split as indented JSON (atomically).

    DusssError if `path` is one of `inputs` (e.g. the manifest: `("manifest", path)` pairs), or exists and
    `overwrite` is not set.
    """
    p = Path(path)
    if p.exists() and p.is_dir():
        raise DataError(p, "is a folder, expected a .json file path")
    check_outputs([p], inputs=inputs, overwrite=overwrite)
    atomic_write_text(p, json.dumps(split, indent=2) + "\n")
    return p


def load_split(path: str | Path, records: Sequence[Record]) -> dict[str, Any]:
    """Read a split file and check it against the manifest's records; DataError naming the file if not."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "split file not found" if not p.exists() else "split file is not a file")
    try:
        split = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(p, f"not valid JSON ({exc})") from None
    if not isinstance(split, dict):
        raise DataError(p, "top level must be a JSON object")
    by_key = {r.key: r for r in records}
    owner: dict[str, str] = {}
    for name in LISTS:
        keys = split.get(name)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise DataError(p, f"'{name}' must be a list of image keys")
        if not keys and name != "unlabeled":
            raise DataError(p, f"split '{name}' is empty")
        expected = "train" if name in ("labeled", "unlabeled") else name
        for k in keys:
            rec = by_key.get(k)
            if rec is None:
                raise DataError(p, f"unknown key {k!r} in '{name}' (not in the manifest)")
            if rec.split != expected:
                raise DataError(p, f"key {k!r} in '{name}' is a {rec.split} row in the manifest")
            if name == "labeled" and not rec.labeled:
                raise DataError(p, f"key {k!r} in 'labeled' has no mask in the manifest")
            if k in owner:
                raise DataError(p, f"key {k!r} is in both '{owner[k]}' and '{name}'")
            owner[k] = name
    _check_cases(p, split, by_key)
    return split


def _check_cases(path: Path, split: dict[str, Any], by_key: dict[str, Record]) -> None:
    """DataError when one case has keys on two sides (train = labeled + unlabeled, val, test)."""
    sides: dict[str, dict[str, tuple[str, str]]] = {}
    for name in LISTS:
        side = "train" if name in ("labeled", "unlabeled") else name
        for k in split[name]:
            sides.setdefault(by_key[k].case_id, {}).setdefault(side, (name, k))
    for case, by_side in sides.items():
        if len(by_side) > 1:
            (n1, k1), (n2, k2) = list(by_side.values())[:2]
            raise DataError(path, f"case {case!r} is in both '{n1}' ({k1!r}) and '{n2}' ({k2!r}): one patient on "
                                  "two sides of the split leaks into the scores")
