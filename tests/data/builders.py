"""Tiny on-disk datasets for the data tests (built per test in tmp_path)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

HEADER = ["image", "mask", "text", "split", "case_id"]


def write_png(path: Path, arr: np.ndarray) -> Path:
    """Save a uint8/uint16 array with Pillow (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_png_declaring(path: Path, height: int, width: int) -> Path:
    """A 1x1 PNG whose IHDR chunk claims `height` x `width` (a few dozen bytes: nothing big is allocated)."""
    import struct
    import zlib

    data = bytearray(write_png(path, np.zeros((1, 1), np.uint8)).read_bytes())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def box_mask(h: int, w: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 {0,1} mask with filled boxes (r0, r1, c0, c1), end-exclusive."""
    m = np.zeros((h, w), dtype=np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 1
    return m


def gradient(h: int = 16, w: int = 16) -> np.ndarray:
    """uint8 gray image whose value grows with the column."""
    return np.tile((np.arange(w) * (255 // max(w - 1, 1))).astype(np.uint8), (h, 1))


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER if header is None else header)
        w.writerows(rows)
    return path


def make_dataset(root: Path, size: int = 16) -> Path:
    """Five rows: train a, b (labeled), c (unlabeled); val d; test e. Returns the manifest path."""
    rows = []
    spec = [
        ("a", "train", True),
        ("b", "train", True),
        ("c", "train", False),
        ("d", "val", True),
        ("e", "test", True),
    ]
    for name, split, labeled in spec:
        write_png(root / "images" / f"{name}.png", gradient(size, size))
        mask = ""
        if labeled:
            write_png(root / "masks" / f"{name}.png", box_mask(size, size, (2, 6, 9, 14)) * 255)
            mask = f"masks/{name}.png"
        rows.append(
            [
                f"images/{name}.png",
                mask,
                "Unilateral pulmonary infection, one infected area, upper left lung.",
                split,
                name,
            ]
        )
    return write_csv(root / "manifest.csv", rows)
