"""benchmarks/monuseg.py: runs of earlier results files join the table only where this call has none."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "monuseg.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_monuseg", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _run(method: str, fraction: float, seed: int, dice: float) -> dict:
    return {"method": method, "fraction": fraction, "seed": seed, "test_dice": dice, "test_miou": dice - 0.1,
            "train_seconds": 1.0, "pseudo_label_dice": {}}


def test_earlier_runs_fill_only_missing_seeds_and_aggregate(tmp_path: Path) -> None:
    m = _module()
    size = m.FULL
    earlier = tmp_path / "seeds01.json"
    earlier.write_text(json.dumps({"size": {**replace(size, seeds=2).__dict__},
                                   "runs": [_run("mt", 0.25, 0, 0.60), _run("mt", 0.25, 1, 0.70),
                                            _run("mt", 0.25, 2, 0.99)]}))
    have = [_run("mt", 0.25, 2, 0.80)]
    joined = have + m.earlier_runs([earlier], size, have)
    assert sorted(r["seed"] for r in joined) == [0, 1, 2]
    assert [r["test_dice"] for r in joined if r["seed"] == 2] == [0.80]  # this call's run wins
    agg = m.aggregate(joined)[("mt", 0.25)]
    assert agg["n_seeds"] == 3
    assert agg["test_dice"]["mean"] == pytest.approx(0.70)
    assert agg["test_dice"]["std"] == pytest.approx(0.10)


def test_earlier_runs_of_another_size_are_refused(tmp_path: Path) -> None:
    m = _module()
    earlier = tmp_path / "other.json"
    earlier.write_text(json.dumps({"size": replace(m.FULL, patience=20).__dict__, "runs": []}))
    with pytest.raises(SystemExit, match="other.json.*patience"):
        m.earlier_runs([earlier], m.FULL, [])
    with pytest.raises(SystemExit, match="missing.json"):
        m.earlier_runs([tmp_path / "missing.json"], m.FULL, [])
