"""`dusss demo --quick`: the whole method end to end, its summary, and its report as a person sees it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.demo import demo_lanes, run_demo

pytestmark = pytest.mark.slow(seconds=55)  # about this long at one thread (tests/conftest.py runs it early)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, quick=True, seed=0)
    return out, summary


def test_summary_has_every_method_and_pseudo_label_dice(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["methods"]) == {"supervised", "mt", "dusss"}
    for r in on_disk["methods"].values():
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["miou"] <= r["dice"] + 1e-9  # IoU <= Dice per image
        assert r["drop"] == pytest.approx(r["best_val"] - r["final_val"]) and r["drop"] >= 0
    # every method trains for the same optimizer steps (one epoch = one pass over the unlabeled stream)
    assert len({r["steps"] for r in on_disk["methods"].values()}) == 1
    assert set(on_disk["pseudo_label_dice"]) == {"teacher", "text", "merged"}
    assert on_disk["seconds"] > 0 and on_disk["seconds"] == pytest.approx(summary["seconds"])
    # trained in two processes at once on a machine with 2+ cores ([VLM -> dusss] beside [supervised -> mt])
    assert on_disk["lanes"] == demo_lanes() and set(on_disk["train_seconds"]) == {"supervised", "mt", "dusss"}
    assert on_disk["vlm_seconds"] > 0 and all((out / m / "DONE").is_file() for m in on_disk["methods"])


def test_report_is_self_contained_and_has_the_table(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    html = (out / "report.html").read_text()
    assert "Test results" in html and "supervised" in html and "dusss" in html
    assert "drop from best" in html
    assert html.count("data:image/png;base64,") >= 4  # overlays, heat-maps, curves inline
    assert "http://" not in html and "https://" not in html
    assert "Text heat-maps" in html
    assert "Training curves" in html and "L_sup is the same term for every method" in html


def test_report_screenshot_is_not_blank(demo: tuple[Path, dict], tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    out, _ = demo
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # text, table and figures, not a blank page
    assert (pixels < 128).mean() > 0.01
