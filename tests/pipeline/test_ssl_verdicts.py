"""Learning tests with verdicts at 25 % labels (issue 18 item 1): `supervised`, `mt`, `unimatch` and `dusss`
on the same phantom split, seed, steps and learning rate, each from its preset, as `dusss train` runs them.

Asserted, per method: no collapse (last-epoch val Dice ≥ 0.9 × its best, the defect of the joint-BatchNorm
Mean Teacher, whose val Dice fell from 0.67 to 0.25–0.36), and the semi-supervised rows not below `supervised`
(final val Dice within `TOLERANCE`). For `dusss`: the text gate opens at
some epoch, and the text-guided mask's pseudo-label Dice on the unlabeled images is above `TEXT_DICE_FLOOR` with
a foreground ratio (predicted / true lesion pixels) within a factor `FG_FACTOR` of 1 (the old generator's mask
was empty in every run: Dice 0, ratio 0).

Checked against the defects they target (session 9, this setting): with the joint labeled + unlabeled BatchNorm
pass (`semi.student_forward: joint`) `mt`'s val Dice peaks at 0.615 and ends at 0.124 (no-collapse and
not-below-supervised fail); with the old text-branch defaults (BCE-only ℓ_text at the run's lr, no warm-up, no
skip stem, L_tg at 1, the Dice gate) the gate never opens and the text mask is empty (Dice 0, ratio 0: the text
test fails).

Not asserted: semi-supervised *above* supervised. At this size (48 px, 210 steps) the networks are still in
the under-confident phase (the share of unlabeled pixels with max(p, 1 − p) ≥ 0.95 is about 0.02), so
UniMatch's thresholded loss is nearly silent; the gain is measured at the benchmark's size
(benchmarks/phantom_ssl.py, docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow(seconds=200)  # about this long at one thread (tests/conftest.py runs it early)

SIZE = 48
EPOCHS = 30
TOLERANCE = 0.03
# measured at this size (seed 0), session 9: text pseudo-label Dice 0.335, foreground ratio 0.36 (the generator
# finds the lesions but marks about a third of their pixels); teacher 0.52, supervised val 0.62, mt 0.66,
# unimatch 0.63. Session 11, the same code with the packages pip resolved that day (transformers 5.24.0,
# numpy 2.4.6; the earlier versions were not recorded): text Dice 0.25 after the warm-up, falling to 0.128 at
# the last epoch, ratio 0.165, while its Dice on the labeled images rose to 0.68 (the generator over-fits the
# 15 labeled images during Step 2; issue 14). The floors below still fail on the defect they target (the old
# generator's empty mask: Dice 0, ratio 0) and leave room for that spread.
TEXT_DICE_FLOOR = 0.05
FG_FACTOR = 8.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split
    from dusss.data.synth import generate_phantoms
    from dusss.engine.logging import read_metrics
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.engine.train import load_train_config, run_train
    from dusss.models.vlm import VLMConfig

    torch.set_num_threads(1)
    root: Path = tmp_path_factory.mktemp("verdicts")
    manifest = generate_phantoms(root / "data", n=64, size=SIZE, seed=5)
    save_split(make_split(read_manifest(manifest), labeled_fraction=0.25, seed=0), root / "splits.json")
    vlm_cfg = VLMConfig()
    vlm_cfg.image.kind = "efficientnet_lite0"  # the demo's VLM
    vlm_cfg.image.image_size = SIZE
    run_pretrain(PretrainConfig(data=str(manifest), out=str(root / "vlm"), epochs=3, batch_size=16, image_size=SIZE,
                                lr=1e-4, seed=0, progress=False, vlm=vlm_cfg), overwrite=True)
    out: dict[str, list[dict]] = {}
    for method in ("supervised", "mt", "unimatch", "dusss"):
        cfg = load_train_config(None, {
            "data": str(manifest), "splits": str(root / "splits.json"), "out": str(root / method), "method": method,
            "vlm": str(root / "vlm" / "vlm.safetensors") if method == "dusss" else "", "epochs": EPOCHS,
            "batch_size": 4, "image_size": SIZE, "lr": 3e-3, "seed": 0, "patience": EPOCHS, "progress": False,
            "unet.base_width": 8, "curves_every": 0})
        run_train(cfg)
        out[method] = read_metrics(root / method / "metrics.jsonl")
    for method, rows in out.items():
        print(method, [round(r["val/dice"], 3) for r in rows],
              {k: round(v, 3) for k, v in rows[-1].items() if k.startswith(("pseudo/", "train/text"))})
    return out


def test_same_steps_for_every_method(runs: dict[str, list[dict]]) -> None:
    steps = {m: rows[-1]["step"] for m, rows in runs.items()}
    assert len(set(steps.values())) == 1 and steps["supervised"] > 0, steps


@pytest.mark.parametrize("method", ["supervised", "mt", "unimatch", "dusss"])
def test_no_collapse(runs: dict[str, list[dict]], method: str) -> None:
    val = [r["val/dice"] for r in runs[method]]
    assert max(val) > 0.4 and val[-1] >= 0.9 * max(val), val


@pytest.mark.parametrize("method", ["mt", "unimatch", "dusss"])
def test_semi_supervised_not_below_supervised(runs: dict[str, list[dict]], method: str) -> None:
    sup, semi = runs["supervised"][-1]["val/dice"], runs[method][-1]["val/dice"]
    assert semi >= sup - TOLERANCE, (method, semi, sup)


def test_text_gate_opens_and_the_text_mask_finds_lesions(runs: dict[str, list[dict]]) -> None:
    rows = runs["dusss"]
    assert max(r["train/text_gate"] for r in rows) > 0, [r["train/text_gate"] for r in rows]
    last = rows[-1]
    assert last["pseudo/text_dice"] > TEXT_DICE_FLOOR, last["pseudo/text_dice"]
    ratio = last["pseudo/text_fg_ratio"]
    assert 1 / FG_FACTOR <= ratio <= FG_FACTOR, ratio
