"""Leftovers of a killed save: the atomic writers' temp files are recognised by name and removed when a run
is resumed or re-entered (with a warning), and nothing else is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dusss.atomic import atomic_write_text, is_temp_leftover, remove_temp_leftovers, temp_file
from dusss.engine.runs import prepare_run_dir


def _leftover(target: Path, size: int = 1024) -> Path:
    """The temp file a `kill -9` inside an atomic save of `target` leaves behind."""
    fd, tmp = temp_file(target)
    os.write(fd, b"\0" * size)
    os.close(fd)
    return Path(tmp)


def test_only_the_atomic_writers_temp_names_are_leftovers(tmp_path: Path) -> None:
    assert is_temp_leftover(_leftover(tmp_path / "state.safetensors").name)
    assert is_temp_leftover(_leftover(tmp_path / "metrics.jsonl").name)
    for name in ("notes.tmp", ".notes.tmp", "model.safetensors.tmp", ".model.safetensors.abc.tmp",
                 ".model.safetensors.ABCDEFGH.tmp", "state.safetensors"):
        assert not is_temp_leftover(name), name


def test_remove_temp_leftovers_keeps_everything_else(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # a completed write leaves no temp file
    ours = [_leftover(tmp_path / "state.safetensors"), _leftover(tmp_path / "model.json")]
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / "sub").mkdir()
    deeper = _leftover(tmp_path / "sub" / "x.json")
    assert sorted(remove_temp_leftovers(tmp_path)) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "notes.tmp", "sub"] and deeper.exists()
    assert remove_temp_leftovers(tmp_path / "missing") == []


@pytest.mark.parametrize("event", ["resume", "re-entry"])
def test_a_resumed_run_removes_the_leftovers_of_a_killed_save(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              event: str) -> None:
    cfg = {"epochs": 1}
    run = prepare_run_dir(tmp_path / "run", cfg, kind="train")
    leftover = _leftover(run / "state.safetensors", 4096)
    (run / "notes.tmp").write_text("mine")
    capsys.readouterr()
    prepare_run_dir(run, cfg, kind="train", resume=event == "resume")
    err = capsys.readouterr().err
    assert not leftover.exists() and (run / "notes.tmp").read_text() == "mine"
    assert err.strip() == (f"warning: {run}: removed 1 temporary file(s) left by an interrupted save "
                           f"({leftover.name})")
    prepare_run_dir(run, cfg, kind="train", resume=True)
    assert capsys.readouterr().err == ""  # nothing left: no message
