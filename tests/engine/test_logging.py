"""MetricsLogger files, truncation on resume, curves plot, progress bars."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dusss.engine.logging import MetricsLogger, group_metric_keys, plot_curves, progress, read_metrics


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_jsonl_and_csv_with_growing_header(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"train/loss": torch.tensor(0.5), "lr": 1e-3})
        log.log(2, {"train/loss": np.float32(0.25), "lr": 5e-4, "val/dice": 0.7, "bad": float("nan")})
        log.log(3, {"train/loss": 0.2, "lr": 1e-4})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(ln) for ln in lines)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[1]["train/loss"] == 0.25 and rows[1]["bad"] is None and rows[0]["step"] == 1
    table = _csv(tmp_path / "metrics.csv")
    assert list(table[0]) == ["step", "time", "train/loss", "lr", "val/dice", "bad"]
    assert [r["val/dice"] for r in table] == ["", "0.7", ""]
    with pytest.raises(ValueError, match="reserved"):
        MetricsLogger(tmp_path, tensorboard=False).log(4, {"step": 1})
    with pytest.raises(ValueError, match="scalar"):
        MetricsLogger(tmp_path, tensorboard=False).log(4, {"loss": torch.ones(3)})


def test_resume_truncates_and_appends(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, tensorboard=False)
    for e in range(1, 5):
        log.log(e, {"loss": 1.0 / e})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # torn line from a killed process
    log = MetricsLogger(tmp_path, tensorboard=False)
    assert len(log.rows) == 4
    assert log.truncate_after(2) == 2
    log.log(3, {"loss": 0.3, "extra": 1})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in _csv(tmp_path / "metrics.csv")] == ["1", "2", "3"]
    # per-iteration rows truncate by their epoch
    log = MetricsLogger(tmp_path / "it", tensorboard=False)
    for step in range(6):
        log.log(step, {"loss": 1.0}, epoch=step // 3)
    assert log.truncate_after(0) == 3
    assert MetricsLogger(tmp_path / "it", fresh=True, tensorboard=False).rows == []


def test_tensorboard_events_written(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"loss": 0.5, "note": "text is skipped"})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_plot_curves_writes_a_coloured_png(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for e in range(1, 6):
            log.log(e, {"train/loss": 1 / e, "train/loss_tg": 0.5 / e, "val/dice": 0.1 * e, "val/dice_std": 0.1,
                        "pseudo/teacher_dice": 0.1 * e, "pseudo/text_dice": 0.05 * e, "pseudo/merged_dice": 0.12 * e,
                        "val/i2t_r1": 0.2, "lr": 10.0 ** -e, "seconds_per_epoch": 1.0})
    groups = group_metric_keys(read_metrics(tmp_path / "metrics.jsonl")[0])
    assert groups == {"loss": ["train/loss", "train/loss_tg"],
                      "pseudo-label Dice": ["pseudo/teacher_dice", "pseudo/text_dice", "pseudo/merged_dice"],
                      "validation Dice / IoU": ["val/dice"], "retrieval R@1": ["val/i2t_r1"],
                      "learning rate": ["lr"]}
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out.stat().st_size > 1000
    img = np.asarray(Image.open(out).convert("RGB"))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1
    # a colour that is not grey: the curves
    assert (np.abs(img[..., 0].astype(int) - img[..., 2].astype(int)) > 60).any()
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png").stat().st_size > 0


def test_progress_is_silent_when_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress(range(3), desc="x", total=3, enabled=False)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(loss=1.0)  # still usable
    assert capsys.readouterr().err == ""
    assert list(progress([1, 2], desc="y")) == [1, 2]


def test_val_stability_hand_values() -> None:
    from dusss.engine.logging import val_stability

    rows = [{"epoch": e, "step": 8 * e, "val/dice": v} for e, v in enumerate([0.1, 0.6, 0.5, 0.6, 0.4], start=1)]
    got = val_stability(rows)
    assert got["best_val"] == 0.6 and got["best_epoch"] == 2  # the first best
    assert got["final_val"] == 0.4 and got["drop"] == pytest.approx(0.2)
    assert got["min_val_after_best"] == 0.4 and got["steps"] == 40
