from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openpyxl
import pytest

from dusss.data.lvit import import_lvit
from dusss.data.manifest import read_manifest
from dusss.errors import DataError

from .builders import box_mask, gradient, write_png

REAL = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "monuseg_lvit"


def _xlsx(
    path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("Image", "Description")
) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    wb.save(path)


def build_lvit_tree(root: Path) -> Path:
    """Train: MoNuSeg naming (+ an image without text, a text without image); Val: QaTa naming in a
    csv; Test: .tif images named .png in the xlsx, one image without a mask."""
    img, mask = gradient(8, 8), box_mask(8, 8, (1, 4, 1, 4)) * 255
    tr = root / "Train_Folder"
    for s in ("a", "b", "c"):
        write_png(tr / "img" / f"{s}.png", img)
        write_png(tr / "labelcol" / f"{s}.png", mask)
    _xlsx(
        tr / "Train_text.xlsx", [("a.png", "Text a."), ("b.png", "  Text   b. "), ("ghost.png", "No image.")]
    )
    va = root / "Val_Folder"
    write_png(va / "img" / "x.png", img)
    write_png(va / "labelcol" / "mask_x.png", mask)
    write_png(va / "labelcol" / "mask_orphan.png", mask)
    with (va / "Val_text.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["Image", "Description"], ["mask_x.png", "Bilateral, two areas."]])
    te = root / "Test_Folder"
    write_png(te / "img" / "t1.tif", img)
    write_png(te / "img" / "t2.tif", img)
    write_png(te / "labelcol" / "t1.png", mask)
    _xlsx(te / "Test_text.xlsx", [("t1.png", "Test one."), ("t2.png", "Test two.")])
    return root


def test_import_tiny_tree(tmp_path: Path) -> None:
    src = build_lvit_tree(tmp_path / "lvit")
    report = import_lvit(src, tmp_path / "out")
    assert report.manifest == tmp_path / "out" / "manifest.csv"
    assert report.counts == {"train": 3, "val": 1, "test": 2}
    assert report.images_without_text == ["Train_Folder/img/c.png"]
    assert report.texts_without_image == ["Train_Folder/Train_text.xlsx: ghost.png"]
    assert report.images_without_mask == ["Test_Folder/img/t2.tif"]
    assert report.masks_without_image == ["Val_Folder/labelcol/mask_orphan.png"]
    recs = {r.case_id: r for r in read_manifest(report.manifest)}
    assert set(recs) == {"a", "b", "c", "x", "t1", "t2"}
    assert recs["a"].key == "../lvit/Train_Folder/img/a.png"  # relative to OUT, not copied
    assert recs["a"].image == src / "Train_Folder" / "img" / "a.png" and recs["a"].image.is_file()
    assert recs["b"].text == "Text b." and recs["c"].text == ""
    assert recs["x"].mask == src / "Val_Folder" / "labelcol" / "mask_x.png" and recs["x"].split == "val"
    assert recs["x"].text == "Bilateral, two areas."
    assert recs["t1"].image.suffix == ".tif" and recs["t1"].text == "Test one." and recs["t1"].split == "test"
    assert recs["t2"].mask is None and not recs["t2"].labeled
    assert not list((tmp_path / "out").glob("*.png"))


def test_missing_folder_and_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        import_lvit(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an LViT dataset"):
        import_lvit(tmp_path / "empty", tmp_path / "out")
    tr = tmp_path / "bad" / "Train_Folder"
    write_png(tr / "img" / "a.png", gradient(4, 4))
    _xlsx(tr / "Train_text.xlsx", [("a.png", "x")], header=("Image", "Text"))
    with pytest.raises(
        DataError, match=r"Train_text.xlsx: missing column\(s\) Description \(found: Image, Text\)"
    ):
        import_lvit(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_images_with_one_stem(tmp_path: Path) -> None:
    tr = tmp_path / "lv" / "Train_Folder"
    write_png(tr / "img" / "a.png", gradient(4, 4))
    write_png(tr / "img" / "a.tif", gradient(4, 4))
    with pytest.raises(DataError, match="two files with the stem 'a': a.png, a.tif"):
        import_lvit(tmp_path / "lv", tmp_path / "out")


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real MoNuSeg (LViT layout) not found at {REAL}")
def test_real_monuseg(tmp_path: Path) -> None:
    report = import_lvit(REAL, tmp_path / "monuseg")
    assert report.counts == {"train": 24, "val": 6, "test": 14}
    assert not (report.images_without_text or report.texts_without_image)
    assert not (report.images_without_mask or report.masks_without_image)
    recs = read_manifest(report.manifest)
    assert sum(r.image.suffix == ".tif" for r in recs) == 14
    assert all(r.image.is_file() and r.mask is not None and r.mask.is_file() and r.text for r in recs)
    by_case = {r.case_id: r.text for r in recs}
    assert by_case["TCGA-21-5784-01Z-00-DX1"] == "The nuclei are evenly distributed."
    shipped = {r.case_id: (r.text, r.split) for r in read_manifest(REAL / "manifest.csv")}
    assert shipped == {r.case_id: (r.text, r.split) for r in recs}
    assert np.unique(np.array([r.split for r in recs])).tolist() == ["test", "train", "val"]
