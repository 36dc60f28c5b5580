"""Self-contained HTML reports: typed sections → one file with inline CSS and data-URI images.

Nothing in the output refers to an external resource; all text is HTML-escaped.

    build_report("report.html", "DuSSS demo", [
        TextSection("About", "Phantom chest X-rays, **25%** labeled."),
        TableSection("Results", ["method", "Dice"], [["mt", 0.71], ["dusss", 0.78]], best={"Dice": "max"}),
        ImageGridSection("Examples", ["image", "mt", "dusss"], [("case 1", [img, ov1, ov2])]),
        ImageSection("Training curves", "run/curves.png"),
    ])
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import mimetypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dusss.atomic import atomic_write_text
from dusss.figures import png_data_uri

ImageLike = np.ndarray | str | Path


@dataclass
class TextSection:
    """Paragraphs of markdown-ish text: blank-line paragraphs, `- ` bullets, **bold**, `code`."""

    title: str
    text: str


@dataclass
class TableSection:
    """A table; `best` maps a column to "max" or "min" and marks its best value(s) (ties included).

    Cells may be numbers (formatted with `float_format`), strings, None (shown as —) or (mean, std)
    tuples (shown as mean ± std, compared by mean).
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    best: Mapping[str, Literal["max", "min"]] = field(default_factory=dict)
    caption: str = ""
    float_format: str = ".3f"


@dataclass
class ImageGridSection:
    """A grid of images: one row per (row_title, images), one column per `column_titles` entry.

    `captions`: one string (the grid's caption), or one per row (shown under each row title); a list of
    another length is shown line by line under the grid.
    Small images are drawn enlarged with crisp pixels.
    """

    title: str
    column_titles: Sequence[str]
    rows: Sequence[tuple[str, Sequence[ImageLike]]]
    captions: str | Sequence[str] | None = None


@dataclass
class ImageSection:
    """One figure: an image array or an image file (e.g. curves.png, embedded as is), with a caption."""

    title: str
    array: ImageLike
    caption: str = ""


Section = TextSection | TableSection | ImageGridSection | ImageSection

CSS = """
:root { --fg:#1d2329; --muted:#5b6670; --line:#d9dee3; --head:#f3f5f7; --best:#e3f4e6; --accent:#1f6f43; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 24px 64px; }
header h1 { margin: 0 0 4px; font-size: 1.7em; }
header p.meta { margin: 0; color: var(--muted); font-size: .9em; }
nav.toc { margin: 18px 0 8px; padding: 10px 14px; background: var(--head); border-radius: 6px; font-size: .92em; }
nav.toc a { color: var(--fg); margin-right: 14px; text-decoration: none; border-bottom: 1px dotted var(--muted); }
section { margin-top: 34px; }
h2 { font-size: 1.25em; margin: 0 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p { margin: .5em 0; } ul { margin: .4em 0 .6em 1.2em; padding: 0; }
code { background: var(--head); padding: 1px 4px; border-radius: 3px; font-size: .92em; }
.table-wrap { overflow-x: auto; }
table.results { border-collapse: collapse; min-width: 50%; font-variant-numeric: tabular-nums; }
table.results caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: .88em;
                        padding-top: 6px; }
table.results th, table.results td { padding: 6px 14px; border-bottom: 1px solid var(--line); text-align: right; }
table.results th:first-child, table.results td:first-child { text-align: left; }
table.results thead th { background: var(--head); border-bottom: 2px solid var(--line); font-weight: 600; }
table.results tbody tr:hover { background: #fafbfc; }
td.best { background: var(--best); font-weight: 700; color: var(--accent); }
figure { margin: 0; }
figcaption { color: var(--muted); font-size: .88em; margin-top: 6px; }
.grid { display: grid; gap: 6px 8px; align-items: center; }
.grid .colhead { font-weight: 600; font-size: .9em; text-align: center; }
.grid .rowhead { font-weight: 600; font-size: .9em; padding-right: 6px; }
.grid .rowhead small { display: block; font-weight: 400; color: var(--muted); }
.grid img { width: 100%; height: auto; display: block; border-radius: 3px; image-rendering: pixelated; }
figure.single img { max-width: 100%; height: auto; display: block; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    s = _esc(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return s


def _text_html(text: str) -> str:
    parts = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [ln.rstrip() for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if all(ln.lstrip().startswith(("- ", "* ")) for ln in lines):
            items = "".join(f"<li>{_inline(ln.lstrip()[2:])}</li>" for ln in lines)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<p>{'<br>'.join(_inline(ln) for ln in lines)}</p>")
    return "\n".join(parts)


def _cell_value(cell: Any) -> float | None:
    if isinstance(cell, tuple) and len(cell) == 2:
        cell = cell[0]
    if isinstance(cell, bool) or cell is None:
        return None
    if isinstance(cell, (int, float, np.integer, np.floating)):
        v = float(cell)
        return v if math.isfinite(v) else None
    return None


def _cell_text(cell: Any, fmt: str) -> str:
    if cell is None:
        return "—"
    if isinstance(cell, tuple) and len(cell) == 2:
        return f"{_cell_text(cell[0], fmt)} ± {_cell_text(cell[1], fmt)}"
    if isinstance(cell, (bool, np.bool_)):
        return str(bool(cell))
    if isinstance(cell, (int, np.integer)):
        return str(int(cell))
    if isinstance(cell, (float, np.floating)):
        return "—" if math.isnan(cell) else format(float(cell), fmt)
    return str(cell)


def _displayed(v: float, fmt: str) -> float:
    try:
        return float(format(v, fmt).rstrip("%"))
    except ValueError:
        return v


def best_cells(section: TableSection) -> set[tuple[int, int]]:
    """(row, column) positions of the best value(s) per `best` column, compared as displayed."""
    marked: set[tuple[int, int]] = set()
    cols = list(section.columns)
    for col, how in section.best.items():
        if col not in cols:
            raise ValueError(f"best: column {col!r} is not one of {cols}")
        if how not in ("max", "min"):
            raise ValueError(f"best[{col!r}] must be 'max' or 'min', got {how!r}")
        j = cols.index(col)
        vals = []
        for i, row in enumerate(section.rows):
            v = _cell_value(row[j]) if j < len(row) else None
            if v is not None:
                vals.append((_displayed(v, section.float_format), i))
        if not vals:
            continue
        target = max(v for v, _ in vals) if how == "max" else min(v for v, _ in vals)
        marked.update((i, j) for v, i in vals if v == target)
    return marked


def _table_html(s: TableSection) -> str:
    marked = best_cells(s)
    head = "".join(f"<th scope=\"col\">{_esc(c)}</th>" for c in s.columns)
    body = []
    for i, row in enumerate(s.rows):
        cells = []
        for j, cell in enumerate(row):
            text = _esc(_cell_text(cell, s.float_format))
            if (i, j) in marked:
                cells.append(f"<td class=\"best\" title=\"best\"><strong>{text}</strong></td>")
            elif j == 0:
                cells.append(f"<th scope=\"row\">{text}</th>")
            else:
                cells.append(f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    cap = f"<caption>{_inline(s.caption)}</caption>" if s.caption else ""
    if s.best and not s.caption:
        cap = "<caption>Best value per column in <strong>bold</strong>.</caption>"
    return (f"<div class=\"table-wrap\"><table class=\"results\">{cap}<thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _img_src(image: ImageLike) -> str:
    if isinstance(image, (str, Path)):
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return png_data_uri(image)


def _grid_html(s: ImageGridSection) -> str:
    ncols = max([len(s.column_titles)] + [len(imgs) for _, imgs in s.rows])
    row_caps: list[str] = []
    fig_caps: list[str] = [s.captions] if isinstance(s.captions, str) and s.captions else []
    if isinstance(s.captions, Sequence) and not isinstance(s.captions, str):
        if len(s.captions) == len(s.rows):
            row_caps = [str(c) for c in s.captions]
        else:  # not one per row: show them all under the grid
            fig_caps = [str(c) for c in s.captions]
    parts = [f"<div class=\"grid\" style=\"grid-template-columns: max-content repeat({ncols}, minmax(0, 260px));\">",
             "<div></div>"]
    parts += [f"<div class=\"colhead\">{_esc(t)}</div>" for t in s.column_titles]
    parts += ["<div></div>"] * (ncols - len(s.column_titles))
    for r, (row_title, images) in enumerate(s.rows):
        sub = f"<small>{_esc(row_caps[r])}</small>" if r < len(row_caps) and row_caps[r] else ""
        parts.append(f"<div class=\"rowhead\">{_esc(row_title)}{sub}</div>")
        for c in range(ncols):
            if c < len(images):
                alt = f"{row_title} / {s.column_titles[c] if c < len(s.column_titles) else c}"
                parts.append(f"<div><img alt=\"{_esc(alt)}\" src=\"{_img_src(images[c])}\"></div>")
            else:
                parts.append("<div></div>")
    parts.append("</div>")
    cap = f"<figcaption>{'<br>'.join(_inline(c) for c in fig_caps)}</figcaption>" if fig_caps else ""
    return f"<figure>{''.join(parts)}{cap}</figure>"


def _image_html(s: ImageSection) -> str:
    cap = f"<figcaption>{_inline(s.caption)}</figcaption>" if s.caption else ""
    return f"<figure class=\"single\"><img alt=\"{_esc(s.title)}\" src=\"{_img_src(s.array)}\">{cap}</figure>"


def _section_html(section: Section) -> str:
    if isinstance(section, TableSection):
        return _table_html(section)
    if isinstance(section, ImageGridSection):
        return _grid_html(section)
    if isinstance(section, ImageSection):
        return _image_html(section)
    if isinstance(section, TextSection):
        return _text_html(section.text)
    raise TypeError(f"unknown report section type {type(section).__name__}")


def _slug(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in used:
        slug, k = f"{base}-{k}", k + 1
    used.add(slug)
    return slug


def render_report(title: str, sections: Sequence[Section], subtitle: str | None = None) -> str:
    """The report as one HTML string (see `build_report`)."""
    for s in sections:
        if not isinstance(s, (TextSection, TableSection, ImageGridSection, ImageSection)):
            raise TypeError(f"unknown report section type {type(s).__name__}")
    used: set[str] = set()
    ids = [_slug(s.title, used) for s in sections]
    body = [
        f"<section id=\"{i}\"><h2>{_esc(s.title)}</h2>\n{_section_html(s)}\n</section>" for s, i in zip(sections, ids)
    ]
    toc = ""
    if len(sections) > 2:
        toc = "<nav class=\"toc\">" + "".join(
            f"<a href=\"#{i}\">{_esc(s.title)}</a>" for s, i in zip(sections, ids)) + "</nav>"
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    meta = _esc(subtitle) + " · " if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>{_esc(title)}</h1><p class=\"meta\">{meta}generated {_esc(stamp)}</p></header>\n"
        f"{toc}\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n"
    )


def build_report(out_html: str | Path, title: str, sections: Sequence[Section], subtitle: str | None = None) -> Path:
    """Write a self-contained HTML report (inline CSS, data-URI images, escaped text); returns its path."""
    out = Path(out_html)
    atomic_write_text(out, render_report(title, sections, subtitle))
    return out
