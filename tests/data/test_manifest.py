from __future__ import annotations

from pathlib import Path

import pytest

from dusss.data.manifest import read_manifest, write_manifest
from dusss.errors import DataError

from .builders import write_csv


def test_read_manifest_resolves_paths_and_labels(tiny_manifest: Path) -> None:
    recs = read_manifest(tiny_manifest)
    assert [r.key for r in recs] == [f"images/{n}.png" for n in "abcde"]
    a, _, c, d, _ = recs
    assert a.image == tiny_manifest.parent / "images" / "a.png"
    assert a.image.is_absolute() and a.mask == tiny_manifest.parent / "masks" / "a.png"
    assert a.labeled and not c.labeled and c.mask is None
    assert [r.split for r in recs] == ["train", "train", "train", "val", "test"]
    assert (a.row, d.row) == (2, 5)  # spreadsheet rows: header is row 1
    assert a.case_id == "a"


def test_empty_case_id_defaults_to_key_and_extra_columns_ignored(tmp_path: Path) -> None:
    m = write_csv(
        tmp_path / "m.csv",
        [["x.png", "", "t", "train", "", "extra"]],
        header=["image", "mask", "text", "split", "case_id", "note"],
    )
    (r,) = read_manifest(m)
    assert r.case_id == "x.png" and r.text == "t"


def test_bom_and_whitespace_are_tolerated(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("\ufeffimage, mask ,text,split,case_id\n x.png ,,hello ,val,c1\n", encoding="utf-8")
    (r,) = read_manifest(m)
    assert (r.key, r.text, r.split) == ("x.png", "hello", "val")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "manifest is empty"),
        ("image,mask,text,split,case_id\n", "manifest has a header but no rows"),
        ("image,mask,split,case_id\na.png,,train,a\n", "missing required column(s) text"),
        (
            "image,mask,text,split,case_id\na.png,,t,training,a\n",
            "row 2: split 'training' is not one of train, val, test",
        ),
        ("image,mask,text,split,case_id\n,,t,train,a\n", "row 2: image is empty"),
        (
            "image,mask,text,split,case_id\na.png,,t,train,a\na.png,,u,val,b\n",
            "row 3: image 'a.png' already listed in row 2",
        ),
    ],
)
def test_bad_manifests_name_the_file_and_the_problem(tmp_path: Path, content: str, message: str) -> None:
    m = tmp_path / "m.csv"
    m.write_text(content)
    with pytest.raises(DataError) as err:
        read_manifest(m)
    assert str(err.value).startswith(f"{m}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    rows = [
        {"image": "i/a.png", "mask": "m/a.png", "text": "One, two.", "split": "train", "case_id": "p1"},
        {"image": "i/b.png", "mask": None, "text": 'quote " inside', "split": "test", "case_id": "p1"},
    ]
    path = write_manifest(tmp_path / "sub" / "manifest.csv", rows)
    text = path.read_text()
    assert text.splitlines()[0] == "image,mask,text,split,case_id"
    recs = read_manifest(path)
    assert [r.text for r in recs] == ["One, two.", 'quote " inside']
    assert recs[1].mask is None and recs[1].case_id == "p1"
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_write_manifest_rejects_rows_without_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing case_id"):
        write_manifest(tmp_path / "m.csv", [{"image": "a", "mask": "", "text": "", "split": "train"}])


def test_multi_line_text_and_row_numbers(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text('image,mask,text,split,case_id\na.png,,"line one\nline two",train,x\n\nb.png,,t,val,y\n')
    a, b = read_manifest(m)
    assert (a.row, a.text) == (2, "line one\nline two")
    assert b.row == 5  # the record after the blank line 4


def test_an_interrupted_manifest_write_keeps_the_old_file_and_leaves_no_stray_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_manifest and save_split go through the one atomic writer (dusss.atomic): a failure before the
    rename keeps the old file and removes its temp file (the old fixed `NAME.tmp` stayed behind)."""
    import os

    from dusss.data.splits import save_split

    target = tmp_path / "manifest.csv"
    target.write_text("old\n")
    split_file = tmp_path / "split.json"
    row = {"image": "a.png", "mask": None, "text": "t", "split": "train", "case_id": "a"}

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(target, [row])
    with pytest.raises(OSError, match="disk full"):
        save_split({"labeled": [], "unlabeled": []}, split_file)
    assert target.read_text() == "old\n" and not split_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]
