"""`dusss export` through the CLI: writes both files and reports them; bad inputs give one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dusss.checkpoint import save_checkpoint
from dusss.cli import main
from dusss.models.unet import UNet, UNetConfig


def _save(path: Path, kind: str = "segmentation") -> Path:
    cfg = UNetConfig(base_width=4)
    model = UNet(cfg)
    save_checkpoint(path, model.state_dict(), kind,
                    {"unet": dataclasses.asdict(cfg), "image_size": 32, "threshold": 0.5, "method": "supervised"})
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_export_writes_model_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "run" / "model.safetensors")
    out = tmp_path / "exported" / "unet.onnx"
    main(["export", "--model", str(tmp_path / "run"), "--format", "onnx", "--out", str(out)])
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{out}.json" in printed
    assert out.is_file() and json.loads(Path(f"{out}.json").read_text())["image_size"] == 32


def test_wrong_kind_checkpoint_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vlm = _save(tmp_path / "vlm.safetensors", kind="vlm")
    line = _one_line_error(capsys, ["export", "--model", str(vlm), "--format", "onnx",
                                    "--out", str(tmp_path / "m.onnx")])
    assert "'vlm' checkpoint" in line and str(vlm) in line
    assert not (tmp_path / "m.onnx").exists()


def test_bad_format_and_missing_model_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _save(tmp_path / "model.safetensors")
    line = _one_line_error(capsys, ["export", "--model", str(ckpt), "--format", "keras", "--out", str(tmp_path / "m")])
    assert "onnx|torchscript" in line
    line = _one_line_error(capsys, ["export", "--model", str(tmp_path / "nope"), "--format", "torchscript",
                                    "--out", str(tmp_path / "m.pt")])
    assert "not found" in line
