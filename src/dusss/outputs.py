"""Output paths: a command never writes over one of its inputs, never replaces an existing file without
`overwrite`, and never writes the outputs of two inputs to the same file.

Every command that writes files at paths the user chooses checks them here before it writes anything
(`check_outputs`); a run folder that `--overwrite` would clear is checked with `inputs_inside`. Inputs
are `(what, path)` pairs, `what` naming the input in the message (e.g. "--model", "manifest row 3").
Paths are compared after resolving symbolic links, and existing files also by inode (hard links).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from dusss.errors import DusssError

Inputs = Iterable[tuple[str, "str | Path | None"]]


def _key(path: str | Path) -> str:
    """A comparable form of `path`: absolute, symbolic links resolved, case-folded where the OS folds case."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def _inode(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name the same file (same resolved path, or the same existing inode)."""
    if _key(a) == _key(b):
        return True
    ia = _inode(a)
    return ia is not None and ia == _inode(b)


def refuse_inputs(outputs: Iterable[str | Path], inputs: Inputs) -> None:
    """DusssError naming the first output that is (the same file as) one of `inputs`."""
    by_key: dict[str, str] = {}
    by_inode: dict[tuple[int, int], str] = {}
    for what, path in inputs:
        if path is None or str(path) == "":
            continue
        by_key.setdefault(_key(path), what)
        ino = _inode(path)
        if ino is not None:
            by_inode.setdefault(ino, what)
    if not by_key:
        return
    for out in outputs:
        what = by_key.get(_key(out))
        if what is None:
            ino = _inode(out)
            what = by_inode.get(ino) if ino is not None else None
        if what is not None:
            raise DusssError(f"{out}: is an input of this command ({what}); refusing to write over it, "
                             "choose another output path")


def check_outputs(outputs: Sequence[str | Path], inputs: Inputs = (), overwrite: bool = False) -> None:
    """Before writing `outputs` (files): refuse one that is an input (even with `overwrite`), one that is a
    folder, and, unless `overwrite`, one that already exists. One-line DusssError naming the path."""
    paths = [Path(p) for p in outputs]
    refuse_inputs(paths, inputs)
    for p in paths:
        if p.is_dir():
            raise DusssError(f"{p}: is a folder where this command writes a file; choose another output path")
    if overwrite:
        return
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        more = f" (and {len(existing) - 1} more file(s) this command writes)" if len(existing) > 1 else ""
        raise DusssError(f"{existing[0]}: already exists{more}; pass --overwrite to replace it, "
                         "or choose another output path")


def inputs_inside(folder: str | Path, inputs: Inputs) -> tuple[str, Path] | None:
    """The first input (what, path) that is `folder` itself or lies inside it, else None."""
    root = _key(folder)
    prefix = root.rstrip(os.sep) + os.sep
    for what, path in inputs:
        if path is None or str(path) == "":
            continue
        k = _key(path)
        if k == root or k.startswith(prefix):
            return what, Path(path)
    return None


def unique_files(paths: Iterable[str | Path]) -> list[Path]:
    """`paths` without repeats of the same file (same resolved path or inode), first occurrence kept."""
    kept: list[Path] = []
    seen_keys: set[str] = set()
    seen_inodes: set[tuple[int, int]] = set()
    for p in paths:
        k, ino = _key(p), _inode(p)
        if k in seen_keys or (ino is not None and ino in seen_inodes):
            continue
        seen_keys.add(k)
        if ino is not None:
            seen_inodes.add(ino)
        kept.append(Path(p))
    return kept


def _base(file: Path) -> str:
    """A file's name without its extension: `scan.png` -> `scan`, `scan.nii.gz` -> `scan`, and a volume's slice
    `vol.nii.gz#slice=12` -> `vol_slice12`."""
    name, _, fragment = file.name.partition("#")
    lower = name.lower()
    for ext in (".nii.gz", ".tar.gz"):
        if lower.endswith(ext):
            name = name[: -len(ext)]
            break
    else:
        name = Path(name).stem
    return f"{name}_{fragment.replace('=', '')}" if fragment else name


def distinct_stems(paths: Sequence[str | Path]) -> list[str]:
    """One output base name per input file, never the same for two inputs (compared case-insensitively).

    A file's base is its stem (`a/scan.png` -> `scan`); files that share a stem are told apart by their
    parent folders, as few as needed, joined with "__" (`a/scan.png`, `b/scan.png` -> `a__scan`, `b__scan`).
    Files that only their extension tells apart (`a/scan.png`, `a/scan.tif`) are refused (DusssError).
    The same file given twice is the caller's to drop first (`unique_files`).
    """
    files = [Path(os.path.realpath(os.fspath(p))) for p in paths]
    folders = [f.parent.relative_to(f.anchor).parts for f in files]  # parent folder names, root excluded
    names = [_base(f) for f in files]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.casefold(), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        depth = max(len(folders[i]) for i in members)
        for k in range(1, depth + 1):
            cand = {i: "__".join([*folders[i][-k:], _base(files[i])]) for i in members}
            if len({c.casefold() for c in cand.values()}) == len(members):
                for i, c in cand.items():
                    names[i] = c
                break
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        j = seen.setdefault(name.casefold(), i)
        if j != i:
            raise DusssError(f"{paths[i]}: would write the same output name {name!r} as {paths[j]}; "
                             "rename one of them or process them into separate output folders")
    return names
