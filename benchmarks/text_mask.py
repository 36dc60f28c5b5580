"""The text branch on its own: which VLM and which text-mask generator make a text-guided mask that localises.

    python benchmarks/text_mask.py                       # every VLM x every generator variant below
    python benchmarks/text_mask.py --vlms vit16 --gens dicebce_skip --steps 100   # one cell, shorter

Data: benchmarks/phantom_ssl.py's phantom set (128 images at 96 px, seed 0; 25 % of the 77 training rows
labeled). Each VLM is pre-trained (DuSSS objective) on every training image-report pair (no masks), then
frozen; each generator variant is fitted on the labeled images only, by the same code as `dusss train`'s
warm-up (`DuSSSMethod.warmup`: ℓ_text + L_tg, batch 8). Measured by `dusss.engine.text_eval.text_mask_scores`
on images the generator never saw with a mask (the unlabeled training rows with their hidden masks: Dice,
own − mirrored report, own − "no infection"; and val: Dice) and by `zone_scores` on the unlabeled rows (zone
margin: mean text probability inside the zone a prompt names minus over the rest of the lungs; zone gain: that
margin minus the same zone's margin under the other zone prompts, 0 for a mask that ignores the prompt; none
gap: the lowest zone prompt's mean lung probability minus that of "No pulmonary infection.").

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
# text conditioning (issue 14 item 4): skip_sub with the text steering where the mask lights up, without and
# with counterfactual reports (`text_swap_reports`: another image's report against the lesions it describes)
for _cond in ("none", "film", "prior"):
    GENS[f"skip_sub_{_cond}"] = {**GENS["skip_sub"], "text_mask.text_condition": _cond}
    GENS[f"skip_swap_{_cond}"] = {**GENS[f"skip_sub_{_cond}"], "text_swap_reports": 0.5}
    # ... and without the Dice half of ℓ_text on empty targets (`text_dice_on_empty: false`)
    GENS[f"skip_subb_{_cond}"] = {**GENS[f"skip_sub_{_cond}"], "text_dice_on_empty": False}
    GENS[f"skip_swapb_{_cond}"] = {**GENS[f"skip_swap_{_cond}"], "text_dice_on_empty": False}
for _base in ("skip_sub_prior", "skip_swapb_prior"):  # a zone-sized prior: 3 × 3 cells (thirds of the image)
    GENS[f"{_base}3"] = {**GENS[_base], "text_mask.prior_grid": 3}


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


def run_cell(vlm_name: str, gen_name: str, steps: int, threads: int, seed: int = 0,
             save_dir: str | None = None) -> dict[str, Any]:
    """Fit generator `gen_name` on the frozen VLM `vlm_name` and measure it (its trainable state saved under
    `save_dir` when given)."""
    import torch

    from dusss.config import load_config
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import load_split
    from dusss.engine.seed import seed_everything
    from dusss.engine.text_eval import text_mask_scores, zone_scores
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
    if save_dir is not None:  # the fitted generator, for re-scoring without refitting
        from safetensors.torch import save_file

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in method.text_mask.trainable_state_dict().items()},
                  str(Path(save_dir) / f"{vlm_name}_{gen_name}_s{seed}_{steps}.safetensors"))
    unl = text_mask_scores(method.text_mask, unlabeled, IMAGE_SIZE)
    va = text_mask_scores(method.text_mask, val, IMAGE_SIZE)
    zones = zone_scores(method.text_mask, unlabeled, IMAGE_SIZE)
    return {"vlm": vlm_name, "gen": gen_name, "steps": steps, "seed": seed, "seconds": seconds,
            "train_reliability": logs.get("text_reliability"), "unl_dice": unl["dice"], "val_dice": va["dice"],
            "own_vs_mirror": unl["own_vs_mirror"], "own_vs_none": unl["own_vs_none"],
            "zone_margin": zones["zone_margin"], "zone_margin_min": zones["zone_margin_min"],
            "zone_hit": zones["zone_hit"], "zone_gain": zones["zone_gain"], "none_gap": zones["none_gap"],
            "none_below": zones["none_below"],
            "zones": zones,
            "kappa": float(method.text_mask.kappa.detach()), "beta": float(method.text_mask.beta.detach())}


def oracle_zone_scores() -> dict[str, dict[str, float]]:
    """`zone_scores` of two ground-truth maps on the unlabeled rows, the scale of the zone columns: "selective"
    lights, under each prompt, exactly the lesions it describes (`caption.described_lesions`); "blind" lights
    every lesion under every lesion prompt (nothing under "No pulmonary infection.")."""
    import numpy as np
    import torch
    from torch import nn

    from dusss.data.caption import described_lesions
    from dusss.data.datasets import SegmentationDataset
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import load_split
    from dusss.engine.text_eval import NONE_PROMPT, zone_prompts, zone_scores

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from phantom_ssl import RUNS as SSL_RUNS
    from phantom_ssl import _data

    manifest, splits = _data(SSL_RUNS)
    records = read_manifest(manifest)
    by_key = {r.key: r for r in records}
    unlabeled = [by_key[k] for k in load_split(splits, records)["unlabeled"]]
    ds = SegmentationDataset(unlabeled, IMAGE_SIZE)
    zone_of = {text: m for text, m in zone_prompts(IMAGE_SIZE).values()}

    class Oracle(nn.Module):
        def __init__(self, selective: bool) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.selective = selective

        def text_logits(self, x: Any, prompts: list[str]) -> Any:
            gt = next(truth)
            maps = [np.zeros_like(gt) if t == NONE_PROMPT else
                    described_lesions(gt, zone_of[t])[1] if self.selective else gt for t in prompts]
            return torch.from_numpy(np.stack(maps)[:, None].astype(np.float32)) * 40 - 20

    out = {}
    for name, selective in (("selective", True), ("blind", False)):
        truth = iter([ds[i]["mask"][0].numpy() >= 0.5 for i in range(len(ds))])  # zone_scores' image order
        out[name] = zone_scores(Oracle(selective), unlabeled, IMAGE_SIZE)
    return out


def table(cells: list[dict[str, Any]]) -> str:
    header = ("| VLM | generator | seed | steps | unlabeled text Dice | val text Dice | own − mirrored report | "
              "own − 'no infection' | zone margin (worst zone) | zone gain | none gap (share below) | s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['vlm']} | {c['gen']} | {c['seed']} | {c['steps']} | {c['unl_dice']:.3f} | "
                     f"{c['val_dice']:.3f} | "
                     f"{c['own_vs_mirror']:+.3f} | {c['own_vs_none']:+.3f} | "
                     f"{c['zone_margin']:+.3f} ({c['zone_margin_min']:+.3f}) | {c['zone_gain']:+.3f} | "
                     f"{c['none_gap']:+.3f} ({c['none_below']:.2f}) | {c['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlms", default=",".join(VLMS), help=f"comma list of {list(VLMS)}")
    ap.add_argument("--gens", default=",".join(GENS), help=f"comma list of {list(GENS)}")
    ap.add_argument("--steps", type=int, default=300, help="generator fitting steps (batch 8 labeled images)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seeds", default="0", help="comma list of generator seeds (init, batches, sub-reports)")
    ap.add_argument("--save-dir", default=None, help="folder for the fitted generators' trainable states")
    ap.add_argument("--results", default=str(RESULTS / "text_mask.json"))
    ap.add_argument("--oracle", action="store_true", help="only print the zone scores of ground-truth maps")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.oracle:
        for name, scores in oracle_zone_scores().items():
            print(name, json.dumps({k: round(v, 3) for k, v in scores.items()}))
        return 0
    cells = []
    for v in args.vlms.split(","):
        for g in args.gens.split(","):
            for seed in (int(x) for x in args.seeds.split(",")):
                cell = run_cell(v, g, args.steps, args.threads, seed, args.save_dir)
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"cells": cells}, indent=2) + "\n")
    print(table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
