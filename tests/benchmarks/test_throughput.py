"""benchmarks/throughput.py: the ratios that replace the fraction of a matmul peak, by hand."""

from __future__ import annotations

import pytest

from .loader import load_benchmark


def _module():
    return load_benchmark("throughput")


def test_ratios_compare_each_step_with_the_bare_step_the_mt_step_and_fp32() -> None:
    m = _module()

    def row(case: str, precision: str, step_s: float, kind: str = "train", size: int = 96) -> dict:
        return {"case": m.TRAIN_CASES.get(case, case), "kind": kind, "image_size": size, "model": "U-Net w16",
                "batch": 16, "precision": precision, "allocator": "default", "step_s": step_s}

    rows = [row("bare", "fp32", 1.0), row("mt", "fp32", 1.5), row("dusss", "fp32", 2.4),
            row("bare", "bf16", 0.5), row("mt", "bf16", 1.0), row("dusss", "bf16", 1.2),
            row("dusss", "fp32", 9.0, size=224), row("U-Net inference (student only)", "bf16", 0.2, "inference")]
    m.ratios(rows)
    assert rows[1]["x_bare"] == pytest.approx(1.5) and rows[2]["x_bare"] == pytest.approx(2.4)
    assert rows[2]["x_mt"] == pytest.approx(1.6) and rows[5]["x_mt"] == pytest.approx(1.2)
    assert rows[4]["x_bare"] == pytest.approx(2.0) and rows[5]["low_vs_fp32"] == pytest.approx(2.0)
    assert rows[3]["low_vs_fp32"] == pytest.approx(2.0) and "x_bare" not in rows[0] and "x_mt" not in rows[1]
    assert rows[6]["x_bare"] is None and rows[6]["x_mt"] is None  # no bare / mt step of that size measured
    assert rows[7]["low_vs_fp32"] is None and "x_bare" not in rows[7]  # inference has no bare step
    table = m.markdown({"machine": {"cpu": "x", "threads": 1, "torch": "t"}, "results": [
        {**r, "images_per_s": 1.0, "flops_per_step": 16e9, "peak_mem_mb": 1.0, "base_mem_mb": 1.0,
         "channels_last": False} for r in rows]})
    assert "| × bare step | dusss × mt | speed-up vs fp32 |" in table
    assert "| 2.40 | 1.60 | – |" in table and "| 2.40 | 1.20 | 2.00 |" in table
