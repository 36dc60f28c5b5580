"""benchmarks/text_ceiling.py: runs grouped by name across seeds, and it never replaces a results file unasked."""

from __future__ import annotations

from pathlib import Path

import pytest

from .loader import load_benchmark


def _module():
    return load_benchmark("text_ceiling")


def _scores(pseudo: float, components: float) -> dict[str, float]:
    return {"pseudo": pseudo, "cells": pseudo, "components": components, "false_positive": 0.5}


def test_summary_groups_seeds_and_gives_the_gain_per_run() -> None:
    m = _module()
    summary = m.summarize({"r/mt_s0": _scores(0.8, 0.9), "r/mt_s1": _scores(0.6, 0.6), "r/sup": _scores(0.7, 0.75)})
    assert set(summary) == {"mt", "sup"}
    assert summary["mt"]["runs"] == 2
    assert summary["mt"]["pseudo"] == pytest.approx([0.7, 0.1])
    assert summary["mt"]["gain"] == pytest.approx([0.05, 0.05])  # gains 0.1 and 0.0
    assert summary["sup"]["gain"] == pytest.approx([0.05, 0.0])
    assert "| mt | 2 | 0.700 ± 0.100 |" in m.table(summary)


def test_refuses_an_existing_results_file_and_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    m = _module()
    results = tmp_path / "c.json"
    results.write_text("{}")
    assert m.main([str(tmp_path), "--results", str(results)]) == 2
    assert "exists (use --overwrite" in capsys.readouterr().err
    assert results.read_text() == "{}"
    assert m.main([str(tmp_path), "--results", str(results), "--overwrite"]) == 2
    assert f"{tmp_path / 'config.yaml'}: not found" in capsys.readouterr().err
