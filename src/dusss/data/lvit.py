"""Import a dataset in the LViT layout into a manifest (the images are referenced, not copied).

Layout: SRC/{Train,Val,Test}_Folder/{img,labelcol}/ plus one `*_text.xlsx` (or `*_text.csv`) per folder
with the columns `Image`, `Description`. Files are matched on their stem, because LViT's names disagree
across folders: MoNuSeg's test xlsx names `.png` files that are `.tif` in img/, and QaTa-COV19 names the
mask (`mask_<image>.png`) in both labelcol/ and the `Image` column. A folder without labelcol/ (or an
image without a mask) gives unlabeled rows. case_id is the image stem. An existing OUT/manifest.csv is
replaced only with `overwrite`, and never when it is one of the dataset's own files.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from dusss.data.manifest import write_manifest
from dusss.data.readers import known_extensions
from dusss.errors import DataError
from dusss.outputs import check_outputs

FOLDERS: dict[str, str] = {"Train_Folder": "train", "Val_Folder": "val", "Test_Folder": "test"}


@dataclass
class ImportReport:
    """What `import_lvit` wrote and what it could not match (paths relative to SRC)."""

    manifest: Path
    counts: dict[str, int] = field(default_factory=dict)
    images_without_text: list[str] = field(default_factory=list)
    texts_without_image: list[str] = field(default_factory=list)
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)


def _stem(name: str) -> str:
    low = name.lower()
    for ext in sorted(known_extensions(), key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _index(folder: Path) -> dict[str, Path]:
    """stem -> file for the image files of a folder; DataError if two files share a stem."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    exts = tuple(known_extensions())
    for f in sorted(folder.iterdir()):
        if not f.is_file() or not f.name.lower().endswith(exts) or f.name.startswith("."):
            continue
        s = _stem(f.name)
        if s in found:
            raise DataError(folder, f"two files with the stem {s!r}: {found[s].name}, {f.name}")
        found[s] = f
    return found


def _read_xlsx(path: Path) -> list[tuple[str, str]]:
    try:
        import openpyxl
    except ImportError:
        raise DataError(path, "reading .xlsx needs openpyxl (pip install openpyxl)") from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken workbook is a user data problem
        raise DataError(
            path, f"cannot read workbook ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    try:
        rows = [
            tuple("" if c is None else str(c) for c in r)
            for r in wb.worksheets[0].iter_rows(values_only=True)
        ]
    finally:
        wb.close()
    return _pairs(path, rows)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [tuple(r) for r in csv.reader(fh)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot read CSV ({exc})") from None
    return _pairs(path, rows)


def _pairs(path: Path, rows: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    if not rows:
        raise DataError(path, "text file is empty (expected columns Image, Description)")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("image", "description") if c not in header]
    if missing:
        shown = ", ".join(h for h in rows[0] if h) or "none"
        raise DataError(path, f"missing column(s) {', '.join(c.title() for c in missing)} (found: {shown})")
    i, d = header.index("image"), header.index("description")
    out = []
    for r in rows[1:]:
        name = r[i].strip() if i < len(r) else ""
        text = " ".join(r[d].split()) if d < len(r) else ""
        if name:
            out.append((name, text))
    return out


def _texts(folder: Path) -> tuple[Path | None, list[tuple[str, str]]]:
    files = sorted(folder.glob("*_text.xlsx")) + sorted(folder.glob("*_text.csv"))
    files = [f for f in files if not f.name.startswith("~$")]
    if not files:
        return None, []
    preferred = [f for f in files if f.stem.lower() == folder.name.split("_")[0].lower() + "_text"]
    path = (preferred or files)[0]
    return path, _read_xlsx(path) if path.suffix.lower() == ".xlsx" else _read_csv(path)


def import_lvit(src: str | Path, out: str | Path, overwrite: bool = False) -> ImportReport:
    """Write OUT/manifest.csv for an LViT-layout dataset at SRC; report unmatched images, masks, texts.

    DusssError before anything is read if OUT/manifest.csv exists and `overwrite` is not set, or (after
    the scan) if it is one of the dataset's files.
    """
    src_p, out_p = Path(src), Path(out)
    if not src_p.is_dir():
        raise DataError(src_p, "dataset folder not found" if not src_p.exists() else "not a folder")
    present = [name for name in FOLDERS if (src_p / name).is_dir()]
    if not present:
        raise DataError(src_p, f"not an LViT dataset: none of {', '.join(FOLDERS)} found")
    if out_p.exists() and not out_p.is_dir():
        raise DataError(out_p, "exists and is not a folder")
    out_abs = Path(os.path.abspath(out_p))
    report = ImportReport(manifest=out_p / "manifest.csv")
    check_outputs([report.manifest], overwrite=overwrite)
    rows = []
    inputs: list[tuple[str, Path]] = []

    def rel_src(p: Path) -> str:
        return Path(os.path.relpath(p, src_p)).as_posix()

    for name in present:
        split = FOLDERS[name]
        folder = src_p / name
        images = _index(folder / "img")
        masks_by_stem = _index(folder / "labelcol")
        masks: dict[str, Path] = {}
        for s in images:
            if s in masks_by_stem:
                masks[s] = masks_by_stem[s]
            elif "mask_" + s in masks_by_stem:
                masks[s] = masks_by_stem["mask_" + s]
        used = {p.name for p in masks.values()}
        report.masks_without_image += [rel_src(p) for p in masks_by_stem.values() if p.name not in used]
        inputs += [("dataset file", p) for p in (*images.values(), *masks_by_stem.values())]
        text_file, pairs = _texts(folder)
        if text_file is not None:
            inputs.append(("dataset text file", text_file))
        texts: dict[str, str] = {}
        for key, text in pairs:
            s = _stem(key)
            target = s if s in images else s[5:] if s.startswith("mask_") and s[5:] in images else None
            if target is None:
                report.texts_without_image.append(f"{rel_src(text_file) if text_file else name}: {key}")
            elif text:  # an empty description leaves the image without text
                texts.setdefault(target, text)
        for s, img in images.items():
            if s not in texts:
                report.images_without_text.append(rel_src(img))
            if s not in masks:
                report.images_without_mask.append(rel_src(img))
            rows.append(
                {
                    "image": Path(os.path.relpath(os.path.abspath(img), out_abs)).as_posix(),
                    "mask": Path(os.path.relpath(os.path.abspath(masks[s]), out_abs)).as_posix()
                    if s in masks
                    else "",
                    "text": texts.get(s, ""),
                    "split": split,
                    "case_id": s,
                }
            )
        report.counts[split] = len(images)
    if not rows:
        raise DataError(src_p, "no images found in {Train,Val,Test}_Folder/img/")
    check_outputs([report.manifest], inputs=inputs, overwrite=overwrite)
    write_manifest(report.manifest, rows)
    return report
