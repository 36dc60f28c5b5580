"""benchmarks/monuseg.py: a thin caller of the `dusss compare` harness (its grids, its table beside the paper's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .loader import load_benchmark

REAL = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "monuseg_lvit"


def _module():
    return load_benchmark("monuseg")


def _row(method: str, labeled: float, dice: float, **extra) -> dict:
    return {"method": method, "labeled": labeled, "seeds": 3, "dice": dice, "dice_std": 0.0123, "iou": dice - 0.1,
            "iou_std": 0.01, "best_val": 0.7, "final_val": 0.69, "pseudo_label_dice": {}, "steps": 300,
            "train_seconds": 41.6, **extra}


def test_paper_table_puts_the_harness_rows_beside_the_paper() -> None:
    m = _module()
    full = {"rows": [_row("supervised", 1.0, 0.7455)]}
    semi = {"rows": [_row("mt", 0.25, 0.6658, wilcoxon_p_vs_dusss=0.01234),
                     _row("dusss", 0.25, 0.683, pseudo_label_dice={"teacher_dice": 0.72, "text_dice": 0.063,
                                                                   "merged_dice": 0.72}),
                     _row("uamt", 0.5, 0.6)]}
    lines = m.paper_table([full, semi]).splitlines()
    assert lines[2] == ("| U-Net (supervised) | 100 % | 74.55 ± 1.23 | 64.55 ± 1.00 | 78.66 / 68.46 | 3 | 70.00 / 69.00 "
                        "| - | - | 300 | 42 |")
    assert lines[3].startswith("| MT | 25 % | 66.58 ± 1.23 | 56.58 ± 1.00 | 72.80 / 56.70 | 3 |")
    assert lines[3].endswith("| - | 0.0123 | 300 | 42 |")
    assert "| 72.0 / 6.3 / 72.0 |" in lines[4] and "| 76.51 / 58.08 |" in lines[4]
    assert lines[5].startswith("| UA-MT | 50 % | 60.00 ± 1.23 | 50.00 ± 1.00 | - |")  # not in the paper's table


def test_overrides_are_keys_the_configs_accept() -> None:
    from dusss.config import load_config
    from dusss.engine.pretrain import PretrainConfig
    from dusss.engine.train import load_train_config

    m = _module()
    size = m.Size(image_size=96, unet_width=8, train_epochs=7, patience=5, batch_size=2, lr=2e-3, pretrain_epochs=3,
                  pretrain_batch_size=4)
    cfg = load_train_config(None, {**m.train_overrides(size, "cpu", 1), "method": "mt"})
    assert (cfg.image_size, cfg.unet.base_width, cfg.epochs, cfg.patience, cfg.batch_size, cfg.lr, cfg.threads) == (
        96, 8, 7, 5, 2, 2e-3, 1)
    pcfg = load_config(PretrainConfig, None, m.pretrain_overrides(size, "cpu", 1))
    assert (pcfg.image_size, pcfg.vlm.image.image_size, pcfg.epochs, pcfg.batch_size) == (96, 96, 3, 4)
    assert size.tag != m.Size(image_size=96, unet_width=8, train_epochs=7, patience=5, batch_size=2, lr=1e-3,
                              pretrain_epochs=3, pretrain_batch_size=4).tag  # every size field names the folder


@pytest.mark.slow(seconds=40)
@pytest.mark.skipif(not REAL.is_dir(), reason=f"MoNuSeg (LViT release) not found at {REAL}")
def test_quick_run_goes_through_the_harness_and_reports_without_retraining(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    m = _module()
    monkeypatch.setattr(m, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(m, "RUNS", tmp_path / "runs")
    results = tmp_path / "res.json"
    argv = ["--quick", "--methods", "supervised,mt", "--image-size", "64", "--threads", "1", "--results", str(results)]
    assert m.main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(results.read_text())
    assert [(r["method"], r["labeled"]) for r in data["grids"]["full"]["rows"]] == [("supervised", 1.0)]
    semi = {(r["method"], r["labeled"]): r for r in data["grids"]["semi"]["rows"]}
    assert set(semi) == {("supervised", 0.5), ("mt", 0.5), ("supervised", 0.25), ("mt", 0.25)}
    assert all(r["steps"] > 0 and 0.0 <= r["dice"] <= 1.0 for r in semi.values())
    assert semi[("mt", 0.25)]["steps"] == semi[("supervised", 0.25)]["steps"]  # the same steps for every method
    assert "| U-Net (supervised) | 100 % |" in printed and "| 78.66 / 68.46 |" in printed
    assert "| MT | 25 % |" in printed and "| 72.80 / 56.70 |" in printed
    root = tmp_path / "runs" / "quick" / data["size"]["tag"]
    runs = sorted(root.glob("*/runs/*/DONE"))
    assert len(runs) == 5
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert m.main([*argv, "--report-only"]) == 0  # tabulates the same cells, trains nothing
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert json.loads(results.read_text())["grids"] == data["grids"]
