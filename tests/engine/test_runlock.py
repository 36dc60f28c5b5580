"""Run-folder lock: taken atomically, refused while a live process holds it, stale locks taken over with a
warning, released on return and on exceptions, kept while `--overwrite` clears the folder, rank 0 only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from dusss.engine.runlock import LOCK_FILE, RunLock, check_unlocked, read_lock
from dusss.engine.runs import check_run_dir, prepare_run_dir
from dusss.errors import DusssError


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier"}))
    return path


def test_lock_holds_pid_and_host_and_refuses_a_second_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLock(run) as lock:
        assert lock.held and run.is_dir()
        holder = read_lock(run)
        assert holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(DusssError, match=rf"{run}: is in use by another dusss run \(process {os.getpid()} on "):
            RunLock(run).acquire()
        with pytest.raises(DusssError, match="in use"):
            check_unlocked(run)
    assert not (run / LOCK_FILE).exists() and not run.exists()  # made by the lock, empty: removed again
    RunLock(run).acquire().release()


def test_a_live_process_lock_is_refused_with_what_to_delete(tmp_path: Path, live_pid: int) -> None:
    lock = _write_lock(tmp_path / "run", live_pid)
    before = lock.read_bytes()
    with pytest.raises(DusssError, match=rf"process {live_pid} on .*delete {lock} if that process is gone") as e:
        RunLock(tmp_path / "run").acquire()
    assert "\n" not in str(e.value) and lock.read_bytes() == before
    with pytest.raises(DusssError, match="in use"):
        check_run_dir(tmp_path / "run", {"epochs": 1}, kind="train")


def test_a_lock_from_another_host_is_refused(tmp_path: Path, dead_pid: int) -> None:
    _write_lock(tmp_path / "run", dead_pid, host="some-other-host")
    with pytest.raises(DusssError, match=f"process {dead_pid} on some-other-host"):
        RunLock(tmp_path / "run").acquire()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, dead_pid: int,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _write_lock(tmp_path / "run", dead_pid)
    check_unlocked(tmp_path / "run")  # stale: not an obstacle
    capsys.readouterr()
    with RunLock(tmp_path / "run"):
        assert read_lock(tmp_path / "run")["pid"] == os.getpid()  # type: ignore[index]
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: {tmp_path / 'run'}: taking over the lock of process {dead_pid} on ")
    assert err.endswith("which is no longer running") and "\n" not in err
    # our own pid, but not held by this process: left by an earlier process with the same pid (a container)
    _write_lock(tmp_path / "run", os.getpid())
    RunLock(tmp_path / "run").acquire().release()


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_FILE
    lock.write_text("")
    with pytest.raises(DusssError, match="an unreadable lock"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    RunLock(tmp_path).acquire().release()
    assert not lock.exists()


def test_prepare_run_dir_keeps_the_lock_on_hold_and_releases_it_on_exceptions(tmp_path: Path) -> None:
    run = prepare_run_dir(tmp_path / "run", {"epochs": 1}, kind="train")  # without hold: released on return
    assert not (run / LOCK_FILE).exists() and (run / "run.json").is_file()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RuntimeError), ExitStack() as hold:
        prepare_run_dir(run, {"epochs": 2}, kind="train", overwrite=True, hold=hold)
        # --overwrite cleared everything of the run folder but its own lock
        assert (run / LOCK_FILE).is_file() and not (run / "metrics.jsonl").exists()
        with pytest.raises(DusssError, match="in use"):
            prepare_run_dir(run, {"epochs": 2}, kind="train")
        raise RuntimeError("the training loop failed")
    assert not (run / LOCK_FILE).exists()
    prepare_run_dir(run, {"epochs": 2}, kind="train")


def test_non_zero_ranks_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dusss.engine.runs.is_main", lambda: False)
    with ExitStack() as hold:
        prepare_run_dir(tmp_path / "run", {"epochs": 1}, kind="train", hold=hold)
        assert not (tmp_path / "run").exists()  # rank 0 creates, locks and writes
