"""Self-contained HTML report: tables with the best value marked, inline images, escaped text."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dusss.figures import save_png
from dusss.report.html import (
    ImageGridSection,
    ImageSection,
    TableSection,
    TextSection,
    best_cells,
    build_report,
)


def _img(v: float) -> np.ndarray:
    return np.full((8, 8, 3), v, np.float32)


def test_report_is_self_contained_with_marked_best(tmp_path: Path) -> None:
    png = save_png(_img(0.3), tmp_path / "curves.png")
    table = TableSection("Results", ["method", "Dice", "HD95"],
                         [["supervised", 0.7012, 9.0], ["mt", 0.7534, 7.5], ["dusss", 0.8123, 8.25]],
                         best={"Dice": "max", "HD95": "min"})
    sections = [
        TextSection("About <setup>", "Phantoms, **25%** labeled.\n\n- one `dusss demo`\n- <script>x</script>"),
        table,
        ImageGridSection("Examples", ["image", "mt", "dusss"],
                         [("case 1", [_img(0), _img(0.5), _img(1)]), ("case 2", [_img(0.2), _img(0.4)])],
                         captions=["easy", "hard"]),
        ImageSection("Training curves", png, caption="loss & Dice"),
        ImageSection("Array", _img(0.9)),
    ]
    out = build_report(tmp_path / "report.html", "DuSSS <demo>", sections, subtitle="quick run")
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert "<table" in html and "<th scope=\"col\">Dice</th>" in html
    assert re.search(r'<td class="best"[^>]*><strong>0\.812</strong></td>', html)
    assert re.search(r'<td class="best"[^>]*><strong>7\.500</strong></td>', html)
    assert html.count('class="best"') == 2
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 7
    assert "http" not in html  # no external resources of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>" not in html
    assert "DuSSS &lt;demo&gt;" in html and "<strong>25%</strong>" in html and "<code>dusss demo</code>" in html
    assert "<li>" in html and "loss &amp; Dice" in html and "easy" in html
    assert 'href="#results"' in html  # table of contents


def test_best_cells_ties_missing_values_and_errors() -> None:
    t = TableSection("t", ["m", "a"], [["x", 0.81234], ["y", (0.81229, 0.01)], ["z", None], ["w", float("nan")]],
                     best={"a": "max"})
    assert best_cells(t) == {(0, 1), (1, 1)}  # equal as displayed (0.812)
    with pytest.raises(ValueError, match="not one of"):
        best_cells(TableSection("t", ["m"], [["x"]], best={"b": "max"}))
    with pytest.raises(ValueError, match="'max' or 'min'"):
        best_cells(TableSection("t", ["m"], [[1.0]], best={"m": "best"}))  # type: ignore[dict-item]


def test_grid_captions_per_row_or_below(tmp_path: Path) -> None:
    grid = ImageGridSection("g", ["image", "p1", "p2"], [("row", [_img(0), _img(1), _img(1)])],
                            captions=["prompt 1: left lung", "prompt 2: right lung"])
    html = build_report(tmp_path / "g.html", "g", [grid]).read_text()
    assert "<figcaption>prompt 1: left lung<br>prompt 2: right lung</figcaption>" in html
    grid.captions = "one caption"
    assert "<figcaption>one caption</figcaption>" in build_report(tmp_path / "g.html", "g", [grid]).read_text()


def test_unknown_section_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        build_report(tmp_path / "r.html", "x", [object()])  # type: ignore[list-item]
