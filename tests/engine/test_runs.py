"""Run folders: overwrite guard, resume, re-entry, written files, split copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dusss.engine.runs import copy_split, prepare_run_dir, read_run
from dusss.errors import DataError, DusssError

CFG = {"epochs": 2, "lr": 1e-3, "model": {"width": 8, "sizes": (1, 2)}, "data": Path("a/b.csv")}


def test_new_run_writes_config_versions_and_record(tmp_path: Path) -> None:
    run = prepare_run_dir(tmp_path / "r", CFG, kind="train")
    assert yaml.safe_load((run / "config.yaml").read_text()) == {
        "epochs": 2, "lr": 1e-3, "model": {"width": 8, "sizes": [1, 2]}, "data": "a/b.csv"}
    versions = json.loads((run / "versions.json").read_text())
    for key in ("python", "torch", "numpy", "transformers", "dusss", "platform", "device", "git"):
        assert key in versions
    record = read_run(run)
    assert record is not None and record["kind"] == "train" and record["created"] and record["command"]
    assert [h["event"] for h in record["history"]] == ["created"]


def test_different_run_is_refused_unless_overwrite_or_resume(tmp_path: Path) -> None:
    out = tmp_path / "r"
    prepare_run_dir(out, CFG, kind="train")
    (out / "metrics.jsonl").write_text("{}\n")
    other = {**CFG, "epochs": 5}
    with pytest.raises(DusssError, match=r"already holds a run .*epochs.*pass --overwrite or --resume") as e:
        prepare_run_dir(out, other, kind="train")
    assert "\n" not in str(e.value)
    with pytest.raises(DusssError, match="already holds a run"):
        prepare_run_dir(out, CFG, kind="pretrain")  # another kind
    with pytest.raises(DusssError, match="cannot resume"):
        prepare_run_dir(out, CFG, kind="pretrain", resume=True)

    # resume with a changed config: allowed, recorded, files kept
    with pytest.warns(UserWarning, match="changed config"):
        prepare_run_dir(out, other, kind="train", resume=True)
    assert (out / "metrics.jsonl").exists()
    rec = read_run(out)
    assert rec is not None and rec["history"][-1]["event"] == "resumed"
    assert rec["history"][-1]["config_changes"] == ["epochs: 2 -> 5"]
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 5

    # overwrite: the folder is cleared and a new run starts
    prepare_run_dir(out, CFG, kind="pretrain", overwrite=True)
    assert not (out / "metrics.jsonl").exists()
    rec = read_run(out)
    assert rec is not None and rec["kind"] == "pretrain" and len(rec["history"]) == 1


def test_same_run_reentry_is_allowed_and_recorded(tmp_path: Path) -> None:
    out = prepare_run_dir(tmp_path / "r", CFG)
    (out / "model.safetensors").write_bytes(b"x")
    prepare_run_dir(out, dict(CFG))  # same kind, same config, no flag
    rec = read_run(out)
    assert rec is not None and [h["event"] for h in rec["history"]] == ["created", "reentered"]
    assert (out / "model.safetensors").exists()  # nothing deleted on re-entry
    # keys listed in `ignore` do not make a run different
    prepare_run_dir(out, {**CFG, "lr": 0.5}, ignore=["lr"])


def test_foreign_folder_and_resume_without_run(tmp_path: Path) -> None:
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DusssError, match="holds no dusss run"):
        prepare_run_dir(foreign, CFG)
    with pytest.raises(DusssError, match="holds no dusss run"):
        prepare_run_dir(foreign, CFG, resume=True)
    prepare_run_dir(foreign, CFG, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"  # not ours: nothing deleted
    # --resume on an empty/missing folder starts a new run (preemption-friendly)
    prepare_run_dir(tmp_path / "new", CFG, resume=True)
    rec = read_run(tmp_path / "new")
    assert rec is not None and rec["history"][0]["event"] == "created"
    (tmp_path / "file").write_text("")
    with pytest.raises(DusssError, match="not a folder"):
        prepare_run_dir(tmp_path / "file", CFG)


def test_copy_split(tmp_path: Path) -> None:
    run = prepare_run_dir(tmp_path / "r", CFG)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"labeled": ["a.png"], "seed": 0}))
    dst = copy_split(split, run)
    assert dst == run / "split.json" and json.loads(dst.read_text())["labeled"] == ["a.png"]
    with pytest.raises(DataError, match="split file not found"):
        copy_split(tmp_path / "missing.json", run)
