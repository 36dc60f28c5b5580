"""`dusss data ...` end to end: good runs print a summary; bad input: one line, exit 1, nothing written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.cli import main
from dusss.data.manifest import read_manifest
from dusss.testing import run_cli_in_process

run = run_cli_in_process  # (exit code, stdout, stderr) of `dusss ARGV`, in process


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _dataset(root: Path) -> Path:
    """train a (labeled), b (labeled), val c, test d; 16x16."""
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 10:14] = 255
    rows = []
    for name, split in (("a", "train"), ("b", "train"), ("c", "val"), ("d", "test")):
        _png(root / "images" / f"{name}.png", np.full((16, 16), 90, np.uint8))
        _png(root / "masks" / f"{name}.png", mask)
        rows.append([f"images/{name}.png", f"masks/{name}.png", "One region.", split, name])
    path = root / "manifest.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "text", "split", "case_id"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "p"
    main(["data", "synth", str(out), "--n", "12", "--size", "64", "--seed", "1"])
    return out / "manifest.csv"


def test_synth_then_verify(phantom: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["data", "verify", str(phantom)], capsys)
    assert code == 0 and err == ""
    assert "rows: 12 (train 8, val 2, test 2)" in out
    assert "labeled: 12, unlabeled: 0" in out and "image sizes: 64x64 (12)" in out and out.endswith("OK\n")


def test_split_command(phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "splits.json"
    code, out, _ = run(
        ["data", "split", str(phantom), "--labeled", "0.25", "--seed", "0", "--out", str(out_file)], capsys
    )
    assert code == 0 and "labeled 2, unlabeled 6, val 2, test 2" in out
    split = json.loads(out_file.read_text())
    assert len(split["labeled"]) == 2 and split["labeled_fraction"] == 0.25


def test_split_bad_fraction_writes_nothing(phantom: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "splits.json"
    code, _, err = run(["data", "split", str(phantom), "--labeled", "0", "--out", str(out_file)], capsys)
    assert code == 1 and err.strip() == "error: labeled fraction must be in (0, 1], got 0.0"
    assert not out_file.exists()


def test_caption_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = np.zeros((90, 90), np.uint8)
    m[5:15, 65:80] = 255
    m[70:85, 10:25] = 255
    _png(tmp_path / "m.png", m)
    code, out, _ = run(["data", "caption", str(tmp_path / "m.png")], capsys)
    assert code == 0
    assert out == (
        f"{tmp_path / 'm.png'}\tBilateral pulmonary infection, two infected areas, "
        "upper left lung and lower right lung.\n"
    )
    code, out, _ = run(["data", "caption", str(tmp_path / "m.png"), "--style", "generic"], capsys)
    assert out.endswith("\tTwo regions: upper right and lower left.\n")
    code, _, err = run(["data", "caption", str(tmp_path / "m.png"), "--style", "poem"], capsys)
    assert code == 1 and "--style must be one of qata, laterality, generic, got 'poem'" in err


def test_caption_help_warns_about_test_time(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["data", "caption", "--help"], capsys)
    assert code == 0 and "never use them at test time" in " ".join(out.split())


def test_import_lvit_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "lvit" / "Train_Folder"
    _png(src / "img" / "a.png", np.zeros((4, 4), np.uint8))
    _png(src / "labelcol" / "a.png", np.zeros((4, 4), np.uint8))
    (src / "Train_text.csv").write_text("Image,Description\na.png,Text.\nb.png,Orphan.\n")
    code, out, err = run(["data", "import-lvit", str(tmp_path / "lvit"), str(tmp_path / "out")], capsys)
    assert code == 0 and "(train 1)" in out
    assert "warning: text without image: Train_Folder/Train_text.csv: b.png" in err
    assert (tmp_path / "out" / "manifest.csv").is_file()
    code, out, err = run(["data", "import-lvit", str(tmp_path / "missing"), str(tmp_path / "o2")], capsys)
    assert code == 1 and err == f"error: {tmp_path / 'missing'}: dataset folder not found\n"
    assert not (tmp_path / "o2").exists()


def _break(kind: str, manifest: Path) -> str:
    root = manifest.parent
    lines = manifest.read_text().splitlines()
    if kind == "corrupt":
        (root / "images/b.png").write_bytes(b"not an image at all")
        return f"{root / 'images/b.png'}: cannot decode image"
    if kind == "zero-byte":
        (root / "images/b.png").write_bytes(b"")
        return f"{root / 'images/b.png'}: file is empty (0 bytes)"
    if kind == "size-mismatch":
        _png(root / "masks/b.png", np.zeros((8, 16), np.uint8))
        return f"{root / 'masks/b.png'}: mask size 8x16 differs from the image size 16x16"
    if kind == "non-binary":
        _png(root / "masks/b.png", np.array([[0, 128, 255, 0]], np.uint8).repeat(16, 0).repeat(4, 1))
        return f"{root / 'masks/b.png'}: mask is not binary: values {{0, 128, 255}}"
    if kind == "missing-file":
        (root / "images/c.png").unlink()
        return f"{root / 'images/c.png'}: file not found"
    if kind == "missing-text":
        lines[2] = lines[2].replace("One region.", "")
    elif kind == "missing-column":
        lines = [",".join(line.split(",")[:4]) for line in lines]
    elif kind == "empty-split":
        lines[4] = lines[4].replace(",test,", ",val,")
    elif kind == "unknown-extension":
        (root / "images/b.xyz").write_bytes(b"x")
        lines[2] = lines[2].replace("images/b.png", "images/b.xyz")
    manifest.write_text("\n".join(lines) + "\n")
    return {
        "missing-text": f"{manifest}: row 3: text is empty",
        "missing-column": f"{manifest}: missing required column(s) case_id",
        "empty-split": f"{manifest}: split 'test' has no rows",
        "unknown-extension": f"{root / 'images/b.xyz'}: unknown image extension .xyz",
    }[kind]


KINDS = [
    "corrupt",
    "zero-byte",
    "size-mismatch",
    "non-binary",
    "missing-file",
    "missing-text",
    "missing-column",
    "empty-split",
    "unknown-extension",
]


@pytest.mark.parametrize("kind", KINDS)
def test_verify_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    manifest = _dataset(tmp_path / "ds")
    expected = _break(kind, manifest)
    before = sorted(p.name for p in (tmp_path / "ds").rglob("*"))
    code, out, err = run(["data", "verify", str(manifest)], capsys)
    lines = err.splitlines()
    assert code == 1 and out == ""
    assert len(lines) == 2 and lines[0].startswith(expected), lines
    assert lines[1] == f"1 problem(s) in {manifest}"
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*")) == before


@pytest.mark.parametrize("kind", ["missing-column", "empty-split", "corrupt"])
def test_split_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    manifest = _dataset(tmp_path / "ds")
    _break(kind, manifest)
    out_file = tmp_path / "s.json"
    code, _, err = run(["data", "split", str(manifest), "--labeled", "0.5", "--out", str(out_file)], capsys)
    if kind == "corrupt":  # split reads the manifest, not the images: it works; verify catches the image
        assert code == 0 and out_file.exists()
        return
    assert code == 1 and len(err.splitlines()) == 1 and str(manifest) in err
    assert not out_file.exists()


def test_synth_bad_arguments_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["data", "synth", str(tmp_path / "o"), "--n", "1"], capsys)
    assert code == 1 and err.startswith("error: --n must be an integer in [3, 1000000]")
    assert not (tmp_path / "o").exists()
    code, _, err = run(["data", "synth", str(tmp_path / "o"), "--caption-style", "poem"], capsys)
    assert code == 1 and err.startswith("error: --caption-style must be one of qata, laterality, generic")
    assert not (tmp_path / "o").exists()


def test_synth_laterality_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["data", "synth", str(tmp_path / "o"), "--n", "8", "--size", "48", "--caption-style", "laterality"], capsys)
    texts = {r.text for r in read_manifest(tmp_path / "o" / "manifest.csv")}
    assert code == 0 and texts and all(t.endswith(("pulmonary infection.", "lung.")) for t in texts)
    assert not any("infected area" in t for t in texts)


def test_console_script_prints_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("image,mask\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dusss", "data", "verify", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert (
        proc.stderr.splitlines()[0]
        == f"{bad}: missing required column(s) text, split, case_id (found: image, mask)"
    )
    assert "Traceback" not in proc.stderr
