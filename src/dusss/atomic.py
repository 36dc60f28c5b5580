"""Atomic file writes (a temp file beside the target, fsync, rename) and the cleanup of their leftovers.

The one writer every layer uses (data files, checkpoints, run files): a reader never sees a half-written
file, and a killed write leaves only a temp file named `.<name>.<8 random characters>.tmp`, which
`remove_temp_leftovers` recognises (on resume, under the run lock).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def umask_mode() -> int:
    """Permissions a normally created file gets (0o666 minus the umask), for temp files renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# Temp files of the atomic writes: `.<name>.<8 random characters of mkstemp>.tmp` beside `<name>`.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def temp_file(path: Path) -> tuple[int, str]:
    """A new temp file beside `path` (named as `is_temp_leftover` recognises); (fd, its path)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def is_temp_leftover(name: str) -> bool:
    """True for a file name of the atomic writers' temp files (left behind only by a killed save)."""
    return bool(_TEMP_NAME.match(name))


def remove_temp_leftovers(folder: str | Path) -> list[Path]:
    """Delete the atomic writers' temp files directly in `folder` (not below); returns what was deleted.

    Only safe when no process is writing into `folder` (e.g. under its run lock): a live save's temp file
    looks the same as a killed one's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if is_temp_leftover(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 `text` to `path`, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
