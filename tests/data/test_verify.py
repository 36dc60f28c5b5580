from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dusss.data.verify import format_summary, verify_manifest

from .builders import box_mask, write_csv, write_png, write_png_declaring


def test_valid_manifest_summary(tiny_manifest: Path) -> None:
    report = verify_manifest(tiny_manifest)
    assert report.ok and report.problems == []
    s = report.summary
    assert s["rows"] == 5 and s["splits"] == {"train": 3, "val": 1, "test": 1}
    assert (s["labeled"], s["unlabeled"]) == (4, 1)
    assert s["image_sizes"] == {"16x16": 5}
    text = format_summary(s)
    assert "rows: 5 (train 3, val 1, test 1)" in text and "labeled: 4, unlabeled: 1" in text
    assert "image sizes: 16x16 (5)" in text


def _rewrite(manifest: Path, row: int, **changes: str) -> None:
    rows = list(csv.DictReader(manifest.open()))
    rows[row].update(changes)
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _break(kind: str, manifest: Path) -> tuple[str, str]:
    """Damage the tiny dataset in one way; return (file named in the problem, problem text)."""
    root = manifest.parent
    if kind == "corrupt":
        (root / "images/b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return str(root / "images/b.png"), "cannot decode image"
    if kind == "zero-byte":
        (root / "images/b.png").write_bytes(b"")
        return str(root / "images/b.png"), "file is empty (0 bytes)"
    if kind == "size-mismatch":
        write_png(root / "masks/b.png", box_mask(12, 16, (1, 3, 1, 3)) * 255)
        return str(root / "masks/b.png"), "mask size 12x16 differs from the image size 16x16 (row 3)"
    if kind == "non-binary":
        write_png(root / "masks/b.png", np.array([[0, 128], [255, 0]], np.uint8).repeat(8, 0).repeat(8, 1))
        return str(root / "masks/b.png"), "mask is not binary: values {0, 128, 255} (row 3)"
    if kind == "missing-file":
        (root / "masks/d.png").unlink()
        return str(root / "masks/d.png"), "file not found (row 5)"
    if kind == "missing-text":
        _rewrite(manifest, 1, text="")
        return str(manifest), "row 3: text is empty"
    if kind == "missing-column":
        rows = list(csv.reader(manifest.open()))
        write_csv(manifest, [r[:4] for r in rows[1:]], header=rows[0][:4])
        return str(manifest), "missing required column(s) case_id"
    if kind == "empty-split":
        _rewrite(manifest, 4, split="val")
        return str(manifest), "split 'test' has no rows"
    if kind == "duplicate-row":
        rows = list(csv.reader(manifest.open()))
        write_csv(manifest, [*rows[1:], rows[1]], header=rows[0])
        return str(manifest), "row 7: duplicate row (same as row 2)"
    if kind == "duplicate-key":
        _rewrite(manifest, 1, image="images/a.png")
        return str(manifest), "row 3: image 'images/a.png' already listed in row 2"
    if kind == "unknown-extension":
        (root / "images/b.xyz").write_bytes(b"xyz")
        _rewrite(manifest, 1, image="images/b.xyz")
        return str(root / "images/b.xyz"), "unknown image extension .xyz"
    if kind == "bad-split":
        _rewrite(manifest, 1, split="training")
        return str(manifest), "row 3: split 'training' is not one of train, val, test"
    if kind == "patient-leakage":
        _rewrite(manifest, 4, case_id="a")
        return str(manifest), "case 'a' has rows in train (row 2) and test (row 6): one patient on two sides"
    if kind == "too-many-pixels":
        write_png_declaring(root / "images/b.png", 20000, 20000)
        return str(root / "images/b.png"), "image declares 400000000 pixels, over the limit of 89478485 pixels"
    if kind == "ambiguous-rgba-mask":
        lesion, other = box_mask(16, 16, (0, 4, 0, 4)), box_mask(16, 16, (8, 12, 8, 12))
        write_png(root / "masks/b.png", np.dstack([lesion, lesion, lesion, other]).astype(np.uint8) * 255)
        return str(root / "masks/b.png"), "ambiguous mask: its gray levels and its alpha channel both vary"
    if kind == "test-without-mask":
        _rewrite(manifest, 4, mask="")
        return str(manifest), "row 6: test rows need a mask"
    raise AssertionError(kind)


BROKEN = [
    "corrupt",
    "zero-byte",
    "size-mismatch",
    "non-binary",
    "missing-file",
    "missing-text",
    "missing-column",
    "empty-split",
    "duplicate-row",
    "duplicate-key",
    "unknown-extension",
    "bad-split",
    "test-without-mask",
    "patient-leakage",
    "too-many-pixels",
    "ambiguous-rgba-mask",
]


@pytest.mark.parametrize("kind", BROKEN)
def test_each_problem_is_one_line_naming_the_file(tiny_manifest: Path, kind: str) -> None:
    file, problem = _break(kind, tiny_manifest)
    report = verify_manifest(tiny_manifest)
    assert len(report.problems) == 1, report.problems
    (line,) = report.problems
    assert line.startswith(file + ":") and problem in line and "\n" not in line


def test_all_problems_are_collected(tiny_manifest: Path) -> None:
    _break("zero-byte", tiny_manifest)
    _break("missing-file", tiny_manifest)
    _break("missing-text", tiny_manifest)
    assert len(verify_manifest(tiny_manifest).problems) == 3


def test_no_labeled_train_row(tmp_path: Path) -> None:
    write_png(tmp_path / "i.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    m = write_csv(
        tmp_path / "m.csv", [["i.png", "", "t", "train", "1"], ["i.png#x", "m.png", "t", "val", "2"]]
    )
    problems = verify_manifest(m).problems
    assert any("no train row has a mask" in p for p in problems)


def test_each_leaking_case_is_one_line_naming_its_splits(tiny_manifest: Path) -> None:
    _rewrite(tiny_manifest, 3, case_id="b")  # val row d
    _rewrite(tiny_manifest, 4, case_id="b")  # test row e
    _rewrite(tiny_manifest, 2, case_id="a")  # two train rows of one case: not a leak
    problems = verify_manifest(tiny_manifest).problems
    expected = (f"{tiny_manifest}: case 'b' has rows in train (row 3), val (row 5) and test (row 6): one patient "
                "on two sides of the split leaks into the scores (give all rows of a case the same split)")
    assert problems == [expected]


def test_a_mask_drawn_in_alpha_verifies_with_its_lesion(tiny_manifest: Path) -> None:
    from dusss.data.readers import read_mask

    lesion = box_mask(16, 16, (2, 6, 9, 14))
    path = tiny_manifest.parent / "masks/b.png"
    write_png(path, np.dstack([np.zeros((16, 16, 3)), lesion[..., None] * 255]).astype(np.uint8))
    assert verify_manifest(tiny_manifest).ok
    assert int(read_mask(path).sum()) == int(lesion.sum()) == 20
