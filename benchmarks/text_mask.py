"""The text branch on its own: which VLM and which text-mask generator make a text-guided mask that localises.

    python benchmarks/text_mask.py                       # every VLM x every generator variant below
    python benchmarks/text_mask.py --vlms vit16 --gens dicebce_skip --steps 100   # one cell, shorter

Data: benchmarks/phantom_ssl.py's phantom set (128 images at 96 px, seed 0; 25 % of the 77 training rows
labeled). Each VLM is pre-trained (DuSSS objective) on every training image-report pair (no masks), then
frozen; each generator variant is fitted on the labeled images only, by the same code as `dusss train`'s
warm-up (`DuSSSMethod.warmup`: ℓ_text + L_tg, batch 8). Measured by `dusss.engine.text_eval.text_mask_scores`
on images the generator never saw with a mask (the unlabeled training rows with their hidden masks: Dice,
own − mirrored report, own − "no infection"; and val: Dice).

Writes benchmarks/results/text_mask.json and prints a markdown table. VLMs are cached in
benchmarks/.runs/text_mask/ (a finished pre-training is reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / ".runs" / "text_mask"
RESULTS = ROOT / "benchmarks" / "results"
IMAGE_SIZE = 96

# name -> (VLMConfig dotted overrides, pre-training epochs)
VLMS: dict[str, tuple[dict[str, Any], int]] = {
    "vit16": ({"image.kind": "vit", "image.patch_size": 16}, 8),
    "vit8": ({"image.kind": "vit", "image.patch_size": 8}, 8),
    "effnet": ({"image.kind": "efficientnet_lite0"}, 8),
}
# name -> (SegMethodConfig dotted overrides for the text branch)
GENS: dict[str, dict[str, Any]] = {
    "bce_tg1": {"text_supervised_loss": "bce", "text_mask_lr": 1e-3, "tg_weight": 1.0},  # the old defaults
    "dicebce_tg1": {"text_supervised_loss": "dice_bce", "text_mask_lr": 1e-2, "tg_weight": 1.0},
    "dicebce_tg0.1": {"text_supervised_loss": "dice_bce", "text_mask_lr": 1e-2, "tg_weight": 0.1},
    "dicebce_tg0": {"text_supervised_loss": "dice_bce", "text_mask_lr": 1e-2, "tg_weight": 0.0},
    "skip_tg0.1": {"text_supervised_loss": "dice_bce", "text_mask_lr": 1e-2, "tg_weight": 0.1,
                   "text_mask.skip_channels": 16},
    "skip_tg0": {"text_supervised_loss": "dice_bce", "text_mask_lr": 1e-2, "tg_weight": 0.0,
                 "text_mask.skip_channels": 16},
    "skip_sub": {"text_supervised_loss": "dice_bce", "text_mask_lr": 1e-2, "tg_weight": 0.0,
                 "text_mask.skip_channels": 16, "text_sub_reports": 0.5},
}
def pretrain_vlm(name: str, manifest: Path, threads: int) -> Path:
    """Pre-train (or reuse) the VLM variant `name`; returns its vlm.safetensors."""
    from dusss.config import from_dict, to_dict
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.models.vlm import VLMConfig

    overrides, epochs = VLMS[name]
    out = RUNS / f"vlm_{name}"
    if not (out / "DONE").is_file():
        vlm = to_dict(VLMConfig())
        vlm["image"]["image_size"] = IMAGE_SIZE
        for key, value in overrides.items():
            section, field = key.split(".")
            vlm[section][field] = value
        lr = 1e-4 if overrides.get("image.kind") == "efficientnet_lite0" else 3e-4
        cfg = PretrainConfig(data=str(manifest), out=str(out), method="dusss", epochs=epochs, batch_size=16,
                             image_size=IMAGE_SIZE, lr=lr, seed=0, threads=threads, progress=False,
                             vlm=from_dict(VLMConfig, vlm))
        run_pretrain(cfg, overwrite=True)
        (out / "DONE").write_text("done\n")
    return out / "vlm.safetensors"


def _batches(records: list[Any], batch_size: int, seed: int) -> Any:
    import itertools

    from dusss.data.datasets import SegmentationDataset
    from dusss.engine.samplers import EpochSampler, epoch_batches

    ds = SegmentationDataset(records, IMAGE_SIZE, augment=True, seed=seed)
    ds.preload()
    return epoch_batches(ds, EpochSampler(len(ds), seed=seed, shuffle=True), batch_size, itertools.count())


def run_cell(vlm_name: str, gen_name: str, steps: int, threads: int, seed: int = 0) -> dict[str, Any]:
    """Fit generator `gen_name` on the frozen VLM `vlm_name` and measure it."""
    import torch

    from dusss.config import load_config
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import load_split
    from dusss.engine.seed import seed_everything
    from dusss.engine.text_eval import text_mask_scores
    from dusss.methods.segmentation import SegMethodConfig, build_seg_method
    from dusss.models.unet import UNet, UNetConfig
    from dusss.models.vlm import VisionLanguageModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from phantom_ssl import RUNS as SSL_RUNS
    from phantom_ssl import _data

    if threads:
        torch.set_num_threads(threads)
    manifest, splits = _data(SSL_RUNS)
    vlm_path = pretrain_vlm(vlm_name, manifest, threads)
    records = read_manifest(manifest)
    split = load_split(splits, records)
    by_key = {r.key: r for r in records}
    labeled = [by_key[k] for k in split["labeled"]]
    unlabeled = [by_key[k] for k in split["unlabeled"]]
    val = [r for r in records if r.split == "val"]
    seed_everything(seed)
    semi = load_config(SegMethodConfig, None, GENS[gen_name])
    method = build_seg_method("dusss", semi, UNet(UNetConfig(base_width=8)), VisionLanguageModel.from_checkpoint(vlm_path))
    t0 = time.time()
    logs = method.warmup(_batches(labeled, 8, seed), steps, lr=1e-3, weight_decay=1e-4)
    seconds = time.time() - t0
    assert method.text_mask is not None
    unl = text_mask_scores(method.text_mask, unlabeled, IMAGE_SIZE)
    va = text_mask_scores(method.text_mask, val, IMAGE_SIZE)
    return {"vlm": vlm_name, "gen": gen_name, "steps": steps, "seed": seed, "seconds": seconds,
            "train_reliability": logs.get("text_reliability"), "unl_dice": unl["dice"], "val_dice": va["dice"],
            "own_vs_mirror": unl["own_vs_mirror"], "own_vs_none": unl["own_vs_none"],
            "kappa": float(method.text_mask.kappa.detach()), "beta": float(method.text_mask.beta.detach())}


def table(cells: list[dict[str, Any]]) -> str:
    header = ("| VLM | generator | steps | unlabeled text Dice | val text Dice | own − mirrored report | "
              "own − 'no infection' | s |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['vlm']} | {c['gen']} | {c['steps']} | {c['unl_dice']:.3f} | {c['val_dice']:.3f} | "
                     f"{c['own_vs_mirror']:+.3f} | {c['own_vs_none']:+.3f} | {c['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlms", default=",".join(VLMS), help=f"comma list of {list(VLMS)}")
    ap.add_argument("--gens", default=",".join(GENS), help=f"comma list of {list(GENS)}")
    ap.add_argument("--steps", type=int, default=300, help="generator fitting steps (batch 8 labeled images)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS / "text_mask.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    cells = []
    for v in args.vlms.split(","):
        for g in args.gens.split(","):
            cell = run_cell(v, g, args.steps, args.threads)
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"cells": cells}, indent=2) + "\n")
    print(table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
