"""Safe checkpoints: atomic safetensors + JSON sidecar, kind checks, foreign files, state loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dusss import checkpoint as ck
from dusss.checkpoint import load_checkpoint, load_state_into, save_checkpoint, sidecar_path
from dusss.errors import CheckpointError


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "sub" / "model.safetensors"
    save_checkpoint(path, model.state_dict(), "segmentation", {"epoch": 3, "path": tmp_path})
    tensors, meta = load_checkpoint(path, "segmentation")
    assert meta["kind"] == "segmentation" and meta["epoch"] == 3 and meta["path"] == str(tmp_path)
    assert meta["format"] == ck.FORMAT and "dusss_version" in meta
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)
    fresh = _model()
    load_state_into(fresh, tensors, path)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]
    _, meta = load_checkpoint(path, ("vlm", "segmentation"))  # any of several kinds


def test_tied_and_view_tensors_can_be_saved(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    save_checkpoint(tmp_path / "t.safetensors", {"a": w, "b": w, "half": w[:2]}, "x", {})
    tensors, _ = load_checkpoint(tmp_path / "t.safetensors", "x")
    assert torch.equal(tensors["b"], w) and torch.equal(tensors["half"], w[:2])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, "segmentation", {"epoch": 1})

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(2)}, "segmentation", {"epoch": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(path, "segmentation")
    assert meta["epoch"] == 1 and torch.equal(tensors["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_stale_sidecar_after_interrupted_save(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, "train_state", {"epoch": 1})
    old_sidecar = sidecar_path(path).read_text()
    save_checkpoint(path, {"w": torch.ones(2)}, "train_state", {"epoch": 2})
    sidecar_path(path).write_text(old_sidecar)  # as if killed between the two renames
    tensors, meta = load_checkpoint(path, "train_state")
    assert meta["epoch"] == 2 and torch.equal(tensors["w"], torch.ones(2))


def test_wrong_kind_missing_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "vlm.safetensors"
    save_checkpoint(path, {"w": torch.zeros(1)}, "vlm", {})
    with pytest.raises(CheckpointError, match=r"is a 'vlm' checkpoint, expected 'segmentation'"):
        load_checkpoint(path, "segmentation")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors", "vlm")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path, "vlm")

    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="no JSON sidecar"):
        load_checkpoint(path, "vlm")

    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(os.urandom(256))
    sidecar_path(foreign).write_text(json.dumps({"format": ck.FORMAT, "kind": "vlm"}))
    with pytest.raises(CheckpointError, match="cannot read safetensors file") as e:
        load_checkpoint(foreign, "vlm")
    assert "\n" not in str(e.value)
    sidecar_path(foreign).write_text(json.dumps({"kind": "vlm"}))
    with pytest.raises(CheckpointError, match="not a dusss checkpoint"):
        load_checkpoint(foreign, "vlm")
    sidecar_path(foreign).write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(foreign, "vlm")


def test_load_state_into_mismatch_is_one_line(tmp_path: Path) -> None:
    state = _model().state_dict()
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: architecture differs.*shape mismatch at 0\.weight") as e:
        load_state_into(bigger, state, tmp_path / "ck.safetensors")
    assert "\n" not in str(e.value)
    partial = {k: v for k, v in state.items() if not k.startswith("2.")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"2 missing \(e\.g\. 2\.weight\); 1 unexpected \(e\.g\. extra\.weight\)"):
        load_state_into(_model(), partial, "ck.safetensors")
