"""Run-folder lock: one dusss process writes a run folder at a time.

The lock is the file `RUN/.dusss.lock`, created atomically (`O_CREAT | O_EXCL`) and holding the owner's
pid, host name, start time and command line as JSON. `RunLock(folder).acquire()` takes it (creating the
folder if needed) and `release()` removes it, only if it is still this lock's. A lock whose process is gone
(same host, pid no longer running) is stale: it is taken over with a one-line warning. A lock held by a
running process, or by a process on another host (which cannot be checked from here), is refused with a
one-line DusssError that says who holds it and which file to delete if that process is known to be gone.

Under torchrun only rank 0 takes the lock (see `dusss.engine.runs.prepare_run_dir`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from dusss import runfiles
from dusss.errors import DusssError, notify

LOCK_FILE = runfiles.LOCK
UNREADABLE_GRACE_S = 10.0  # a lock file without content younger than this is being written right now

_HELD: set[str] = set()  # lock files this process holds (a lock naming our own pid but not here is stale)


def lock_path(folder: str | Path) -> Path:
    """The lock file of run folder `folder`."""
    return Path(folder) / LOCK_FILE


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The holder recorded in `folder`'s lock file, {} if the file exists but is unreadable, None if none."""
    path = lock_path(folder)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _pid_running(pid: int) -> bool:
    """True when a process `pid` exists on this host (or when that cannot be told)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists (owned by someone else), or unknowable: assume running
    return True


def _is_stale(folder: Path, holder: dict[str, Any]) -> bool:
    """A lock is stale when its process is known to be gone: same host, pid not running (or ours, unheld)."""
    if not holder:  # unreadable: stale once it is old enough not to be a lock being written
        try:
            return time.time() - lock_path(folder).stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int):
        return True
    if pid == os.getpid():  # our pid: held by this process, or left by an earlier one that had our pid
        return os.path.realpath(lock_path(folder)) not in _HELD
    return not _pid_running(pid)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock"
    since = f" since {holder['since']}" if holder.get("since") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{since}"


def _in_use(folder: Path, holder: dict[str, Any]) -> DusssError:
    return DusssError(f"{folder}: is in use by another dusss run ({_describe(holder)}); wait for it to finish, "
                      f"or delete {lock_path(folder)} if that process is gone")


def check_unlocked(folder: str | Path) -> None:
    """DusssError if another live process holds `folder`'s lock; reads only (a stale lock passes)."""
    folder = Path(folder)
    holder = read_lock(folder)
    if holder is not None and not _is_stale(folder, holder):
        raise _in_use(folder, holder)


class RunLock:
    """The lock of one run folder; a context manager (`with RunLock(run): ...`) or acquire()/release()."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.created_folder = False  # acquire() made the folder; release() removes it if still empty
        self._token: str | None = None

    @property
    def held(self) -> bool:
        """True between a successful `acquire` and `release`."""
        return self._token is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder if missing); DusssError if a live process holds it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise DusssError(f"{self.folder}: exists and is not a folder")
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        token = uuid.uuid4().hex
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "command": shlex.join(sys.argv), "token": token})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_lock(self.folder)
                if holder is None:
                    continue  # released meanwhile: try again
                if not _is_stale(self.folder, holder):
                    raise _in_use(self.folder, holder) from None
                notify(f"{self.folder}: taking over the lock of {_describe(holder)}, which is no longer running")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(content)
            self._token = token
            _HELD.add(os.path.realpath(self.path))
            return self
        raise _in_use(self.folder, read_lock(self.folder) or {})

    def release(self) -> None:
        """Remove the lock file if it is still this lock's, and the folder if acquire() made it and nothing
        was written into it (idempotent)."""
        if self._token is None:
            return
        token, self._token = self._token, None
        _HELD.discard(os.path.realpath(self.path))
        holder = read_lock(self.folder)
        if holder and holder.get("token") == token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self.created_folder:
            try:
                self.folder.rmdir()  # only succeeds while empty
            except OSError:
                pass

    def __enter__(self) -> RunLock:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
