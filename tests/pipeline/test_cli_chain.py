"""The whole chain from the command line on a tiny phantom set:
synth → verify → split → pretrain → train (each method) → evaluate → predict → textmap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow(seconds=90)  # about this long at one thread (tests/conftest.py runs it early)

TINY_VLM = """\
vlm:
  image: {image_size: 32, hidden_size: 16, num_layers: 1, num_heads: 2, patch_size: 8}
  text: {random_init: true, num_layers: 1, hidden_size: 16, num_heads: 2, intermediate_size: 32, dropout: 0.0}
  head_hidden: 32
  pdt_heads: 2
  embed_dim: 16
"""


def dusss(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(check=False, args=[sys.executable, "-m", "dusss", *args], cwd=cwd, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, f"dusss {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    dusss("data", "synth", "data", "--n", "32", "--size", "32", "--seed", "1", cwd=root)
    out = dusss("data", "verify", "data/manifest.csv", cwd=root)
    assert "OK" in out.stdout
    dusss("data", "split", "data/manifest.csv", "--labeled", "0.25", "--seed", "0", "--out", "splits.json", cwd=root)
    (root / "tiny.yaml").write_text(TINY_VLM)
    dusss("pretrain", "--data", "data/manifest.csv", "--out", "vlm", "--config", "tiny.yaml", "--epochs", "2",
          "--batch-size", "8", "--image-size", "32", "--quiet", cwd=root)
    for method in ("supervised", "mt", "dusss"):
        args = ["train", "--data", "data/manifest.csv", "--splits", "splits.json", "--out", method, "--method", method,
                "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--width", "4", "--quiet"]
        if method == "dusss":  # with the text-mask warm-up and an image-skip f_g (textmap must rebuild it)
            (root / "dusss.yaml").write_text("semi: {text_warmup_steps: 3, text_mask: {skip_channels: 4}}\n")
            args += ["--vlm", "vlm/vlm.safetensors", "--config", "dusss.yaml"]
        dusss(*args, cwd=root)
    return root


def test_pretrain_writes_run_files(chain: Path) -> None:
    run = chain / "vlm"
    for name in ("config.yaml", "versions.json", "metrics.jsonl", "metrics.csv", "curves.png", "vlm.safetensors",
                 "vlm.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    assert "val/i2t_R@1" in rows[-1] and "val/t2i_R@5" in rows[-1]
    assert json.loads((run / "vlm.json").read_text())["kind"] == "vlm"


def test_train_runs_write_models_metrics_and_pseudo_label_dice(chain: Path) -> None:
    for method in ("supervised", "mt", "dusss"):
        run = chain / method
        for name in ("model.safetensors", "model.json", "last.safetensors", "state.safetensors", "split.json",
                     "config.yaml", "metrics.jsonl", "curves.png"):
            assert (run / name).is_file(), (method, name)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0.0 <= last["val/dice"] <= 1.0
    dusss_row = json.loads((chain / "dusss" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("pseudo/teacher_dice", "pseudo/text_dice", "pseudo/merged_dice"):
        assert 0.0 <= dusss_row[key] <= 1.0
    assert (chain / "dusss" / "text_mask.safetensors").is_file()
    first = json.loads((chain / "dusss" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= first["warmup/text_reliability"] <= 1.0 and first["warmup/seconds"] > 0


def test_evaluate_writes_metrics_and_per_image_rows(chain: Path) -> None:
    out = dusss("evaluate", "--model", "dusss", "--data", "data/manifest.csv", "--split", "test", cwd=chain)
    shown = json.loads(out.stdout)
    metrics = json.loads((chain / "dusss" / "eval" / "test" / "metrics.json").read_text())  # one folder per split
    assert metrics["split"] == "test" and metrics["threshold"] == 0.5
    assert shown["dice"] == pytest.approx(metrics["dice"])
    n_test = sum(1 for line in (chain / "data" / "manifest.csv").read_text().splitlines()[1:] if ",test," in line)
    per_image = (chain / "dusss" / "eval" / "test" / "per_image.csv").read_text().splitlines()
    assert len(per_image) == n_test + 1


def test_predict_needs_only_the_image(chain: Path) -> None:
    images = sorted((chain / "data" / "images").glob("*.png"))[:2]
    dusss("predict", "--model", "mt", *map(str, images), "--out", "pred", cwd=chain)
    for img in images:
        mask = np.asarray(Image.open(chain / "pred" / f"{img.stem}_mask.png"))
        assert mask.shape == np.asarray(Image.open(img)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert (chain / "pred" / f"{img.stem}_overlay.png").is_file()


def test_textmap_draws_one_panel_per_prompt(chain: Path) -> None:
    image = min((chain / "data" / "images").glob("*.png"))
    dusss("textmap", str(image), "lower left lung", "upper right lung", "--vlm", "vlm/vlm.safetensors",
          "--model", "dusss", "--out", "heat.png", cwd=chain)
    heat = np.asarray(Image.open(chain / "heat.png"))
    assert heat.shape[1] > 2 * heat.shape[0]  # three panels side by side
