"""`dusss compare`: a resumable grid of methods x label fractions x seeds on one manifest, and its table (mean ±
std over seeds, parameters, steps, pseudo-label Dice, a paired Wilcoxon test against the reference method)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

from dusss.data.synth import generate_phantoms
from dusss.engine.compare import Cell, forward_flops, run_compare, write_table
from dusss.engine.logging import read_metrics
from dusss.errors import ConfigError
from dusss.models.unet import UNet, UNetConfig
from dusss.testing import run_cli_in_process

pytestmark = pytest.mark.slow(seconds=30)  # about this long at one thread (tests/conftest.py runs it early)

TINY = {"epochs": 1, "batch_size": 2, "image_size": 32, "unet.base_width": 4, "device": "cpu"}


def _dice(run: Path) -> dict[str, float]:
    with open(run / "eval" / "test" / "per_image.csv", newline="") as fh:
        return {r["key"]: float(r["dice"]) for r in csv.DictReader(fh)}


def test_grid_table_and_resume(tmp_path: Path) -> None:
    manifest = generate_phantoms(tmp_path / "ph", n=24, size=32, seed=0)
    out = tmp_path / "grid"
    table = run_compare(manifest, ["supervised", "mt"], [0.5], [0, 1], out, overrides=TINY, reference="mt",
                        progress=False)
    assert [(r["method"], r["labeled"], r["seeds"]) for r in table["rows"]] == [("supervised", 0.5, 2), ("mt", 0.5, 2)]
    runs = {c: out / "runs" / Cell(*c).name for c in (("supervised", 0.5, 0), ("supervised", 0.5, 1),
                                                         ("mt", 0.5, 0), ("mt", 0.5, 1))}
    per_seed = {c: json.loads((r / "eval" / "test" / "metrics.json").read_text())["dice"] for c, r in runs.items()}
    sup, mt = table["rows"]
    assert sup["dice"] == pytest.approx((per_seed[("supervised", 0.5, 0)] + per_seed[("supervised", 0.5, 1)]) / 2)
    assert sup["dice_std"] == pytest.approx(abs(per_seed[("supervised", 0.5, 0)] - per_seed[("supervised", 0.5, 1)])
                                            / math.sqrt(2))
    assert sup["parameters"] == sum(p.numel() for p in UNet(UNetConfig(base_width=4)).parameters())
    assert sup["flops"] == mt["flops"] == forward_flops(UNet(UNetConfig(base_width=4)), 32) > 0
    assert sup["steps"] == mt["steps"] > 0 and sup["pseudo_label_dice"] == {} and "teacher_dice" in mt["pseudo_label_dice"]
    a = {f"{s}:{k}": v for s in (0, 1) for k, v in _dice(runs[("mt", 0.5, s)]).items()}
    b = {f"{s}:{k}": v for s in (0, 1) for k, v in _dice(runs[("supervised", 0.5, s)]).items()}
    keys = sorted(k for k in a if not (math.isnan(a[k]) or math.isnan(b[k])))
    assert sup["wilcoxon_p_vs_mt"] == pytest.approx(wilcoxon([a[k] for k in keys], [b[k] for k in keys]).pvalue)
    assert "wilcoxon_p_vs_mt" not in mt
    md = (out / "table.md").read_text()
    assert "| supervised | 50% |" in md and "Wilcoxon p vs mt" in md
    # finished cells are not re-run; a cell without its test evaluation is evaluated again, not retrained
    stamps = {c: (r / "DONE").stat().st_mtime_ns for c, r in runs.items()}
    (runs[("mt", 0.5, 1)] / "eval" / "test" / "metrics.json").unlink()
    (runs[("mt", 0.5, 1)] / "eval" / "test" / "per_image.csv").unlink()
    again = run_compare(manifest, ["supervised", "mt"], [0.5], [0, 1], out, overrides=TINY, reference="mt",
                        progress=False)
    assert {c: (r / "DONE").stat().st_mtime_ns for c, r in runs.items()} == stamps
    assert again == table
    # stability per row: best and last val Dice over each run's epochs, and the drop between them, over seeds
    vals = {c: [float(row["val/dice"]) for row in read_metrics(r / "metrics.jsonl")] for c, r in runs.items()}
    best = [max(vals[("supervised", 0.5, s)]) for s in (0, 1)]
    last = [vals[("supervised", 0.5, s)][-1] for s in (0, 1)]
    assert sup["best_val"] == pytest.approx(sum(best) / 2) and sup["final_val"] == pytest.approx(sum(last) / 2)
    assert sup["drop"] == pytest.approx((best[0] - last[0] + best[1] - last[1]) / 2) and sup["drop"] >= 0
    assert f"| {sup['best_val']:.3f} / {sup['final_val']:.3f} |" in md
    # tabulating alone trains nothing, and refuses a grid whose cells have not all finished
    assert write_table(out, ["supervised", "mt"], [0.5], [0, 1], reference="mt") == table
    with pytest.raises(ConfigError, match=r"2 cell\(s\) of the grid have not finished: supervised_l50_s2, mt_l50_s2"):
        write_table(out, ["supervised", "mt"], [0.5], [0, 1, 2])
    assert not (runs[("mt", 0.5, 1)].parent / "supervised_l50_s2").exists()


def test_progress_lines_show_the_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = generate_phantoms(tmp_path / "ph", n=24, size=32, seed=0)
    run_compare(manifest, ["supervised"], [0.5, 1.0], [0], tmp_path / "g", overrides={**TINY, "progress": False})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("compare: ")]
    assert lines[0] == "compare: 0 done, running supervised_l50_s0, 1 left"
    assert lines[1].startswith("compare: 1 done, running supervised_l100_s0, 0 left, ") and lines[1].endswith(" s per cell")


def test_bad_grids_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = generate_phantoms(tmp_path / "ph", n=24, size=32, seed=0)
    with pytest.raises(ConfigError, match="unknown segmentation method 'fixmatch'"):
        run_compare(manifest, ["supervised", "fixmatch"], [0.5], [0], tmp_path / "g")
    code, _, err = run_cli_in_process(["compare", "--data", str(manifest), "--methods", "supervised", "--out",
                                       str(tmp_path / "g"), "--labeled", "half"], capsys)
    assert code == 1 and "--labeled 'half'" in err
    assert not (tmp_path / "g").exists()


def test_text_guided_methods_get_one_pretrained_vlm_per_seed_and_objective(tmp_path: Path) -> None:
    manifest = generate_phantoms(tmp_path / "ph", n=24, size=32, seed=0)
    tiny_vlm = {"epochs": 1, "batch_size": 4, "image_size": 32, "device": "cpu", "vlm.image.image_size": 32,
                "vlm.image.hidden_size": 16, "vlm.image.num_layers": 1, "vlm.image.num_heads": 2,
                "vlm.text.random_init": True, "vlm.text.num_layers": 1, "vlm.text.hidden_size": 16,
                "vlm.text.num_heads": 2, "vlm.text.intermediate_size": 32, "vlm.embed_dim": 8, "vlm.head_hidden": 16,
                "vlm.pdt_heads": 2}
    out = tmp_path / "grid"
    table = run_compare(manifest, ["supervised", "dusss", "amvlm"], [0.5], [0], out,
                        overrides={**TINY, "semi.text_warmup_steps": 2}, pretrain_overrides=tiny_vlm, progress=False)
    assert (out / "vlm_s0" / "vlm.safetensors").is_file() and not (out / "vlm_s1").exists()
    assert sorted(p.name for p in out.glob("vlm_*")) == ["vlm_amvlm_s0", "vlm_s0"]  # one per objective
    sup, dusss, _ = table["rows"]
    assert table["reference"] == "dusss" and 0.0 <= sup["wilcoxon_p_vs_dusss"] <= 1.0
    assert {"teacher_dice", "text_dice", "merged_dice"} <= set(dusss["pseudo_label_dice"])
    import yaml

    cfg = yaml.safe_load((out / "runs" / "dusss_l50_s0" / "config.yaml").read_text())
    assert Path(cfg["vlm"]) == out / "vlm_s0" / "vlm.safetensors" and cfg["method"] == "dusss"
    # the amvlm row gets a VLM pre-trained with AMVLM's objective (CSS + PDT, ICL), not DuSSS's
    cfg = yaml.safe_load((out / "runs" / "amvlm_l50_s0" / "config.yaml").read_text())
    assert Path(cfg["vlm"]) == out / "vlm_amvlm_s0" / "vlm.safetensors" and cfg["method"] == "amvlm"
    for run, objective in (("vlm_s0", "dusss"), ("vlm_amvlm_s0", "amvlm")):
        assert yaml.safe_load((out / run / "config.yaml").read_text())["method"] == objective


def test_forward_flops_of_a_convolution_by_hand() -> None:
    import torch

    conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1, bias=False)
    assert forward_flops(conv, 8) == 2 * 3 * 4 * 9 * 8 * 8  # 2 FLOPs per multiply-add, one per output tap
    assert conv.training  # the mode is restored
