"""The manifest: one CSV per dataset with columns image,mask,text,split,case_id.

Paths are relative to the manifest's folder (absolute paths are accepted too). `mask` may be empty for
unlabeled-only rows; `split` is one of train/val/test; `case_id` groups slices of one patient (an empty
case_id makes the row its own case), and all rows of a case must share one split (`data verify`,
`data split` and split files refuse a case on two sides: patient leakage). A row is identified by `Record.key`, the `image` string as written.
`Record.row` is the line where the row starts in the file: the header is line 1, the first row line 2.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dusss.atomic import atomic_write_text
from dusss.errors import DataError

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "mask", "text", "split", "case_id")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One manifest row with its paths resolved against the manifest's folder."""

    key: str
    image: Path
    mask: Path | None
    text: str
    split: str
    case_id: str
    row: int

    @property
    def labeled(self) -> bool:
        """True when the row has a mask."""
        return self.mask is not None


def resolve_path(folder: Path, value: str) -> Path:
    """`value` (relative to `folder`, or absolute) as an absolute, normalised path; keeps `#...` suffixes."""
    return Path(os.path.normpath(os.path.join(os.path.abspath(folder), value)))


def read_table(path: str | Path) -> list[tuple[int, dict[str, str]]]:
    """Raw rows `(row_number, {column: stripped value})`; DataError if unreadable, column-less or empty."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "manifest not found" if not p.exists() else "manifest is not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(p, "manifest is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(p, f"cannot read manifest ({exc.strerror or exc})") from None
    if not text.strip():
        raise DataError(p, "manifest is empty (expected a header image,mask,text,split,case_id)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as exc:
        raise DataError(p, f"not a valid CSV file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            p, f"missing required column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'})"
        )
    rows: list[tuple[int, dict[str, str]]] = []
    row_no = reader.line_num + 1  # the line where the next record starts; the header is line 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) > len(header):
                    raise DataError(p, f"row {row_no}: {len(cells)} cells but the header has {len(header)}")
                cells = cells + [""] * (len(header) - len(cells))
                rows.append((row_no, {h: c.strip() for h, c in zip(header, cells)}))
            row_no = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(p, f"not a valid CSV file ({exc})") from None
    if not rows:
        raise DataError(p, "manifest has a header but no rows")
    return rows


def row_problem(values: dict[str, str]) -> str | None:
    """The structural problem of one raw row (empty image, bad split), or None."""
    if not values["image"]:
        return "image is empty"
    if values["split"] not in SPLITS:
        return f"split {values['split']!r} is not one of {', '.join(SPLITS)}"
    return None


def cases_across_splits(rows: Iterable[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    """Cases with rows in more than one split (patient leakage), from `(case_id, split, row)` triples:
    `{case_id: {split: its first row}}`, splits in train/val/test order."""
    seen: dict[str, dict[str, int]] = {}
    for case, split, row in rows:
        seen.setdefault(case, {}).setdefault(split, row)
    order = {s: i for i, s in enumerate(SPLITS)}
    return {c: dict(sorted(by.items(), key=lambda kv: order.get(kv[0], len(order))))
            for c, by in seen.items() if len(by) > 1}


def leak_message(case: str, rows_by_split: dict[str, int]) -> str:
    """'case 'p1' has rows in train (row 2) and test (row 7)' plus what it means, for one leaking case."""
    parts = [f"{s} (row {r})" for s, r in rows_by_split.items()]
    where = " and ".join(parts) if len(parts) == 2 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (f"case {case!r} has rows in {where}: one patient on two sides of the split leaks into the scores "
            "(give all rows of a case the same split)")


def refuse_leaks(records: Iterable[Record], source: str | Path) -> None:
    """DataError naming `source` when a case has rows in more than one split (the first such case, and how
    many more there are)."""
    leaks = cases_across_splits((r.case_id, r.split, r.row) for r in records)
    if leaks:
        case, rows_by_split = next(iter(leaks.items()))
        more = f" ({len(leaks) - 1} more case(s) like it)" if len(leaks) > 1 else ""
        raise DataError(source, leak_message(case, rows_by_split) + more)


def make_record(folder: Path, row_no: int, values: dict[str, str]) -> Record:
    """Build a Record from one raw row (no file-system checks)."""
    key = values["image"]
    return Record(
        key=key,
        image=resolve_path(folder, key),
        mask=resolve_path(folder, values["mask"]) if values["mask"] else None,
        text=values["text"],
        split=values["split"],
        case_id=values["case_id"] or key,
        row=row_no,
    )


def read_manifest(path: str | Path) -> list[Record]:
    """Parse a manifest; DataError (naming the manifest and row) on missing columns, bad rows, duplicates."""
    p = Path(path)
    folder = p.parent
    records: list[Record] = []
    seen: dict[str, int] = {}
    for row_no, values in read_table(p):
        problem = row_problem(values)
        if problem:
            raise DataError(p, f"row {row_no}: {problem}")
        if values["image"] in seen:
            raise DataError(
                p, f"row {row_no}: image {values['image']!r} already listed in row {seen[values['image']]}"
            )
        seen[values["image"]] = row_no
        records.append(make_record(folder, row_no, values))
    return records


def record_files(records: list[Record]) -> list[tuple[str, Path]]:
    """(what, file) of every image and mask the rows name (`#slice=N` dropped): the inputs behind a manifest."""
    out: list[tuple[str, Path]] = []
    for r in records:
        for what, p in (("image", r.image), ("mask", r.mask)):
            if p is not None:
                s = str(p)
                out.append((f"{what} of manifest row {r.row}", Path(s.rpartition("#")[0] if "#slice=" in s else s)))
    return out


def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows (dicts with the required columns; `mask` None -> empty) as a manifest CSV."""
    p = Path(path)
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise DataError(p, f"row {i + 2}: missing {', '.join(missing)}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REQUIRED_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else str(row[c]) for c in REQUIRED_COLUMNS])
    atomic_write_text(p, buf.getvalue())
    return p
