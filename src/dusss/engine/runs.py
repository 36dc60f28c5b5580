"""Run folders: overwrite guard, resolved config, software versions, run record, split copy.

A run folder is marked by `run.json` (kind, creation time, command line, history of entries).
`prepare_run_dir` decides what may happen to a folder before any work starts:

| folder holds                                 | no flag      | `resume`       | `overwrite`          |
|----------------------------------------------|--------------|----------------|----------------------|
| nothing (missing or empty)                   | new run      | new run        | new run              |
| a run of the same kind and the same config   | re-entered   | resumed        | cleared, new run     |
| a run of the same kind, another config       | DusssError   | resumed (*)    | cleared, new run     |
| a run of another kind                        | DusssError   | DusssError     | cleared, new run     |
| other files but no run.json                  | DusssError   | DusssError     | written into (**)    |

Re-entering (same kind, same config, no flag) starts the same run over in place: the config, versions
and run record are rewritten, nothing else is deleted; the caller starts fresh (e.g. a fresh
`MetricsLogger`) and its files replace the old ones as they are written. (*) Resuming with a changed
config is allowed (e.g. more epochs): the changed keys are recorded in run.json and a warning is shown;
keys the caller freezes (`frozen_on_resume`, e.g. the architecture) may not change (DusssError).
(**) Without run.json the folder is not known to be ours, so nothing in it is deleted.
"Clearing" removes everything inside a folder that holds run.json; an input of the command (the manifest,
the split, the VLM checkpoint, a manifest row's image, ...) inside a folder that would be cleared is
refused instead (DusssError naming it).

One process at a time: `prepare_run_dir` takes the folder's lock (`dusss.engine.runlock`) before it writes,
so a second run on a folder that another live process is writing is refused (a stale lock of a dead
process is taken over, with a warning). Pass `hold` (an ExitStack) to keep the lock until the run ends;
without it the lock is released when the folder is prepared. A resumed or re-entered run first deletes
the temp files a killed atomic save left behind (`.<name>.<random>.tmp`), with a warning.

Only rank 0 writes and locks; every rank reads and takes the same decision, so errors are raised on all ranks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from dusss import runfiles
from dusss.atomic import atomic_write_text, remove_temp_leftovers
from dusss.distributed import barrier, broadcast_object, is_main
from dusss.engine.runlock import LOCK_FILE, RunLock, check_unlocked
from dusss.errors import DataError, DusssError, notify
from dusss.outputs import Inputs, inputs_inside

RUN_FILE, CONFIG_FILE, VERSIONS_FILE, SPLIT_FILE = runfiles.RUN, runfiles.CONFIG, runfiles.VERSIONS, runfiles.SPLIT


def plain(value: Any) -> Any:
    """Dataclasses, Paths, tuples, numpy scalars → plain YAML/JSON values (dicts, lists, str, numbers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool):
        return value
    for tp in (int, float, str):  # also numpy subclasses (np.float64 is a float) → exact builtins
        if isinstance(value, tp):
            return tp(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return str(value)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two (nested) config dicts, as 'key: old -> new'."""
    a, b = _flatten(plain(old)), _flatten(plain(new))
    skip = tuple(ignore)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _git_commit() -> dict[str, Any] | None:
    """Commit of the git checkout that holds the dusss sources, or None (no git, not a checkout)."""
    pkg = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True,
                                 timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # the sources must be tracked there (not a wheel installed inside some other repository)
    if not commit or git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect_versions() -> dict[str, Any]:
    """Python, library, platform and device versions, plus the git commit when available."""
    import numpy
    import torch

    from dusss import __version__

    device: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cuda": None}
    if torch.cuda.is_available():
        device["cuda"] = {
            "runtime": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    return {
        "dusss": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "transformers": _package_version("transformers"),
        "safetensors": _package_version("safetensors"),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "git": _git_commit(),
    }


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _clear(folder: Path) -> None:
    """Remove everything inside `folder` but its lock."""
    for p in folder.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _plain_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    cfg = plain(config)
    if not isinstance(cfg, dict):
        raise TypeError("config must be a mapping or a dataclass")
    return cfg


def _decide(out: Path, cfg: dict[str, Any], overwrite: bool, resume: bool, kind: str, ignore: Iterable[str],
            frozen_on_resume: Iterable[str], inputs: Inputs = ()) -> tuple[dict[str, Any] | None, str, list[str]]:
    """The guard of the module docstring, read-only: (run record or None, event, changed keys) or DusssError."""
    if out.exists() and not out.is_dir():
        raise DusssError(f"{out}: exists and is not a folder")
    record = _read_json(out / RUN_FILE) if (out / RUN_FILE).is_file() else None
    if (out / RUN_FILE).is_file() and not isinstance(record, dict):
        record = {"kind": None}  # unreadable run.json: still a run folder
    event = "created"
    changed: list[str] = []
    if record is not None:
        old_kind = record.get("kind")
        try:
            old_cfg = yaml.safe_load((out / CONFIG_FILE).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            old_cfg = None
        changed = config_diff(old_cfg or {}, cfg, ignore) if isinstance(old_cfg, dict) else ["<config missing>"]
        if overwrite:
            event = "overwritten"
            inside = inputs_inside(out, inputs)
            if inside is not None:
                raise DusssError(f"{inside[1]}: is an input of this command ({inside[0]}) inside {out}, which "
                                 "--overwrite would clear; choose another output folder")
        elif old_kind != kind:
            if resume:
                raise DusssError(f"{out}: holds a {old_kind!r} run, cannot resume it as {kind!r}; "
                                 "pass --overwrite or choose another output folder")
            raise DusssError(f"{out}: already holds a run (of kind {old_kind!r}); pass --overwrite or --resume")
        elif resume:
            frozen = tuple(frozen_on_resume)
            locked = [c for c in changed if any(c.split(":", 1)[0] == f or c.startswith(f + ".") for f in frozen)]
            if locked:
                raise DusssError(f"{out}: cannot resume with a different {locked[0]}"
                                 f"{f' (and {len(locked) - 1} more)' if len(locked) > 1 else ''}; "
                                 "pass --overwrite to start a new run or choose another output folder")
            event = "resumed"
        elif changed:
            raise DusssError(f"{out}: already holds a run (config differs: {changed[0]}"
                             f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                             "pass --overwrite or --resume")
        else:
            event = "reentered"
    elif out.is_dir() and _visible_entries(out) and not overwrite:
        raise DusssError(f"{out}: folder is not empty and holds no dusss run; "
                         "pass --overwrite to write into it or choose another output folder")
    return record, event, changed


def check_run_dir(
    out: str | Path,
    config: Mapping[str, Any] | Any,
    overwrite: bool = False,
    resume: bool = False,
    kind: str = "train",
    ignore: Iterable[str] = (),
    frozen_on_resume: Iterable[str] = (),
    inputs: Inputs = (),
) -> None:
    """Raise the DusssError `prepare_run_dir` would raise for these arguments, writing nothing.

    For a loop to call before it reads data or builds models, so that a taken output folder (another run,
    or a folder another live process has locked) is reported at once; `prepare_run_dir` decides again when
    the run actually starts. No collective ops. The lock is rank 0's: other ranks do not look at it (under
    torchrun, rank 0's error ends the job).
    """
    out = Path(out)
    _decide(out, _plain_config(config), overwrite, resume, kind, ignore, frozen_on_resume, inputs)
    if is_main() and out.is_dir():
        check_unlocked(out)


def prepare_run_dir(
    out: str | Path,
    config: Mapping[str, Any] | Any,
    overwrite: bool = False,
    resume: bool = False,
    kind: str = "train",
    ignore: Iterable[str] = (),
    frozen_on_resume: Iterable[str] = (),
    inputs: Inputs = (),
    hold: ExitStack | None = None,
) -> Path:
    """Create or re-open run folder `out` for a run of `kind` with resolved `config` (dict or dataclass).

    Applies the guard in the module docstring (a different run → one-line DusssError), takes the folder's
    lock, then rank 0 writes config.yaml, versions.json and run.json. `ignore` lists dotted config keys that
    do not make a run different (e.g. "device", "progress"). `frozen_on_resume` lists dotted keys (or
    sections) that a resume may not change (the architecture: its checkpoint would not load); changing one is
    refused before anything is written. `inputs` are the command's (what, path) inputs, refused inside a
    folder that --overwrite would clear. The lock is released when `hold` closes (or, without `hold`, on
    return). Returns the folder.

    Under torchrun call it on every rank: it synchronises them with a broadcast and a barrier.
    """
    out = Path(out)
    cfg = _plain_config(config)
    inputs = list(inputs)
    record, event, changed = _decide(out, cfg, overwrite, resume, kind, ignore, frozen_on_resume, inputs)

    # --- lock, then decide again under the lock (rank 0): another process may have written meanwhile ---
    lock: RunLock | None = None
    failure: DusssError | None = None
    if is_main():
        lock = RunLock(out)
        try:
            lock.acquire()
            record, event, changed = _decide(out, cfg, overwrite, resume, kind, ignore, frozen_on_resume, inputs)
        except DusssError as exc:
            lock.release()
            failure = exc
        except BaseException:
            lock.release()
            raise
    message = broadcast_object(None if failure is None else str(failure))  # every rank has read, rank 0 locked
    if failure is not None:
        raise failure
    if message is not None:
        raise DusssError(message)

    # --- write (rank 0) ---
    if is_main():
        assert lock is not None
        try:
            _write_run(out, cfg, kind, record, event, changed)
        except BaseException:
            lock.release()
            raise
        if hold is not None:
            hold.callback(lock.release)
        else:
            lock.release()
    barrier()
    return out


def _write_run(out: Path, cfg: dict[str, Any], kind: str, record: dict[str, Any] | None, event: str,
               changed: list[str]) -> None:
    """Rank 0's writes of `prepare_run_dir`, under the folder's lock."""
    if event == "overwritten":
        _clear(out)
    elif event in ("resumed", "reentered"):
        removed = remove_temp_leftovers(out)
        if removed:
            names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
            notify(f"{out}: removed {len(removed)} temporary file(s) left by an interrupted save ({names})")
    out.mkdir(parents=True, exist_ok=True)
    now, cmd = _now(), _command_line()
    entry: dict[str, Any] = {"event": event, "time": now, "command": cmd}
    if event == "resumed" and changed:
        entry["config_changes"] = changed
        warnings.warn(f"{out}: resuming with a changed config: {'; '.join(changed[:5])}", stacklevel=3)
    if record is None or event == "overwritten":
        new_record: dict[str, Any] = {"kind": kind, "created": now, "command": cmd, "history": [entry]}
    else:
        new_record = {**record, "kind": kind}
        new_record["history"] = [*record.get("history", []), entry]
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(out / VERSIONS_FILE, json.dumps(collect_versions(), indent=2))
    atomic_write_text(out / RUN_FILE, json.dumps(new_record, indent=2))


def read_run(run: str | Path) -> dict[str, Any] | None:
    """The run record of folder `run` (its run.json), or None if it holds no run."""
    path = Path(run) / RUN_FILE
    data = _read_json(path) if path.is_file() else None
    return data if isinstance(data, dict) else None


def copy_split(split_path: str | Path, run: str | Path) -> Path:
    """Copy the split file into the run folder as split.json; returns the copy's path.

    Only rank 0 writes; no collective op, so it may be called on rank 0 alone or on every rank.
    """
    src, dst = Path(split_path), Path(run) / SPLIT_FILE
    if not src.is_file():
        raise DataError(src, "split file not found")
    if is_main():
        try:
            text = src.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(src, f"cannot read split file ({exc.__class__.__name__})") from None
        if src.resolve() != dst.resolve():
            atomic_write_text(dst, text)
    return dst
