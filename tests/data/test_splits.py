from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dusss.data.manifest import Record
from dusss.data.splits import load_split, make_split, save_split
from dusss.errors import ConfigError, DataError


def _rec(key: str, split: str, case: str, labeled: bool = True) -> Record:
    return Record(key, Path("/d") / key, Path("/d/m") / key if labeled else None, "t", split, case, 0)


def known_records() -> list[Record]:
    """8 train cases x 2 slices (case p7 unlabeled), 2 val, 2 test."""
    recs = [_rec(f"p{c}_s{s}.png", "train", f"p{c}", labeled=c != 7) for c in range(8) for s in range(2)]
    recs += [_rec("v1.png", "val", "v1"), _rec("v2.png", "val", "v2")]
    recs += [_rec("t1.png", "test", "t1"), _rec("t2.png", "test", "t2")]
    return recs


@pytest.mark.parametrize(("fraction", "cases"), [(0.25, 2), (0.3, 2), (0.5, 4), (0.01, 1), (7 / 8, 7)])
def test_counts_are_whole_cases(fraction: float, cases: int) -> None:
    split = make_split(known_records(), fraction, seed=0)
    assert len(split["labeled"]) == 2 * cases
    assert len(split["labeled"]) + len(split["unlabeled"]) == 16
    labeled_cases = {k.split("_")[0] for k in split["labeled"]}
    unlabeled_cases = {k.split("_")[0] for k in split["unlabeled"]}
    assert len(labeled_cases) == cases and not labeled_cases & unlabeled_cases
    assert "p7" not in labeled_cases  # a case without masks is never labeled
    assert split["val"] == ["v1.png", "v2.png"] and split["test"] == ["t1.png", "t2.png"]
    assert (split["labeled_fraction"], split["seed"]) == (fraction, 0)


def test_deterministic_and_seed_dependent() -> None:
    a = make_split(known_records(), 0.5, seed=1)
    assert a == make_split(known_records(), 0.5, seed=1)
    others = [make_split(known_records(), 0.5, seed=s)["labeled"] for s in range(2, 8)]
    assert any(o != a["labeled"] for o in others)


def test_case_order_does_not_change_the_chosen_cases() -> None:
    a = make_split(known_records(), 0.25, seed=5)
    b = make_split(list(reversed(known_records())), 0.25, seed=5)
    assert sorted(a["labeled"]) == sorted(b["labeled"])


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"labeled fraction must be in \(0, 1\]"):
        make_split(known_records(), fraction, seed=0)


def test_fraction_beyond_labeled_cases() -> None:
    with pytest.raises(ConfigError, match="asks for 8 of 8 train cases, but only 7 have masks"):
        make_split(known_records(), 1.0, seed=0)


def test_missing_val_rows_and_no_masks() -> None:
    recs = [r for r in known_records() if r.split != "val"]
    with pytest.raises(DataError, match="m.csv: the manifest has no val rows"):
        make_split(recs, 0.5, 0, source="m.csv")
    unl = [_rec("a.png", "train", "a", False), _rec("v.png", "val", "v"), _rec("t.png", "test", "t")]
    with pytest.raises(DataError, match="no train row has a mask"):
        make_split(unl, 0.5, 0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    recs = known_records()
    split = make_split(recs, 0.25, seed=0)
    path = save_split(split, tmp_path / "s" / "splits.json")
    assert json.loads(path.read_text()) == split
    assert load_split(path, recs) == split


def _write(tmp_path: Path, **changes: object) -> Path:
    split = make_split(known_records(), 0.25, seed=0)
    split.update(changes)
    return save_split(split, tmp_path / "splits.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labeled": ["nope.png"]}, "unknown key 'nope.png' in 'labeled' (not in the manifest)"),
        ({"val": []}, "split 'val' is empty"),
        ({"test": ["v1.png"]}, "key 'v1.png' in 'test' is a val row in the manifest"),
        ({"labeled": ["p7_s0.png"]}, "key 'p7_s0.png' in 'labeled' has no mask"),
        ({"unlabeled": ["p0_s0.png", "p0_s0.png"]}, "key 'p0_s0.png' is in both"),
        ({"labeled": "p0_s0.png"}, "'labeled' must be a list of image keys"),
    ],
)
def test_load_split_rejects_bad_files(tmp_path: Path, changes: dict, message: str) -> None:
    path = _write(tmp_path, **changes)
    with pytest.raises(DataError) as err:
        load_split(path, known_records())
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_load_split_missing_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split file not found"):
        load_split(tmp_path / "none.json", known_records())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split(bad, known_records())


# --- one case, one side (issue 17, class 4: patient leakage) -------------------------------------------------


def _leaking_records() -> list[Record]:
    """known_records() with test row t1 re-assigned to train case p0 (rows numbered as in a file)."""
    recs = [dataclasses.replace(r, row=i + 2) for i, r in enumerate(known_records())]
    return [dataclasses.replace(r, case_id="p0") if r.key == "t1.png" else r for r in recs]


def test_make_split_refuses_a_case_in_two_manifest_splits() -> None:
    with pytest.raises(DataError) as err:
        make_split(_leaking_records(), 0.5, seed=0, source="m.csv")
    assert str(err.value) == ("m.csv: case 'p0' has rows in train (row 2) and test (row 20): one patient on two "
                              "sides of the split leaks into the scores (give all rows of a case the same split)")


def test_make_split_keeps_every_case_on_one_side() -> None:
    recs = [_rec(f"c{c}_s{s}.png", "train", f"c{c}") for c in range(10) for s in range(3)]
    recs += [_rec("v.png", "val", "v"), _rec("t.png", "test", "t")]
    for seed in range(5):
        split = make_split(recs, 0.3, seed=seed)
        sides = {}
        for name in ("labeled", "unlabeled"):
            for key in split[name]:
                sides.setdefault(key.split("_")[0], set()).add(name)
        assert all(len(s) == 1 for s in sides.values()) and len(split["labeled"]) == 9


def test_load_split_refuses_a_case_on_two_sides(tmp_path: Path) -> None:
    recs = _leaking_records()
    split = make_split(known_records(), 0.25, seed=0)
    split["labeled"] = sorted({*split["labeled"], "p0_s0.png", "p0_s1.png"})
    split["unlabeled"] = [k for k in split["unlabeled"] if not k.startswith("p0_")]
    path = save_split(split, tmp_path / "splits.json")
    with pytest.raises(DataError) as err:
        load_split(path, recs)
    assert str(err.value) == (f"{path}: case 'p0' is in both 'labeled' ('p0_s0.png') and 'test' ('t1.png'): one "
                              "patient on two sides of the split leaks into the scores")
