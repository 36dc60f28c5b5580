"""Semi-supervised core on the phantom set: supervised vs mt vs unimatch, same labels, same steps, 3 seeds.

    python benchmarks/phantom_ssl.py                          # 3 seeds x (supervised, mt, unimatch), 40 epochs
    python benchmarks/phantom_ssl.py --methods mt --set semi.student_forward=joint   # the collapse ablation
    python benchmarks/phantom_ssl.py --seeds 0 --epochs 3     # smoke check
    python benchmarks/phantom_ssl.py --extra-test 512         # + every run's best-val model on 512 new phantoms

Data: the demo's phantom set (128 images at 96 px, seed 0; 25 % of the 77 training rows labeled, split
seed 0), U-Net width 16, batch 8 labeled + 8 unlabeled, AdamW lr 3e-3 cosine (chosen on val Dice of
`supervised`, seed 0: 1e-3 left the training loss at 0.49 after 320 steps, docs/benchmarks.md), no early stopping. One epoch is a
pass over the unlabeled stream (8 optimizer steps), the same steps for every method. Each method starts from
its preset (`dusss.methods.segmentation.METHOD_PRESETS`); `--set key=value` overrides any TrainConfig key.
The best-val checkpoint is evaluated once on the test split. Writes benchmarks/results/phantom_ssl.json and
prints a markdown table: test Dice mean ± std, best and final val Dice, the drop from best, steps, seconds.
Resumable: finished runs (DONE + eval) are not re-run.

The pinned test split has 26 images, too few to separate methods a few Dice points apart (one model's test
Dice moves by ~0.03 with the images drawn). `--extra-test N` also scores each best-val model on N phantoms
drawn with another generator seed (1; never used for training or selection), all of them a test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # text_mask.py (the shared VLM variants)
RUNS = ROOT / "benchmarks" / ".runs" / "phantom_ssl"
RESULTS = ROOT / "benchmarks" / "results"
# chosen on supervised val Dice (seed 0): 1e-3 0.771, 3e-3 0.843, 1e-2 0.821 (docs/benchmarks.md, session 9)
LR = 3e-3


def _data(root: Path, labeled: float = 0.25) -> tuple[Path, Path]:
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split
    from dusss.data.synth import generate_phantoms

    manifest = root / "data" / "manifest.csv"
    splits = root / ("splits.json" if labeled == 0.25 else f"splits_{round(labeled * 100)}.json")
    if not manifest.is_file():
        generate_phantoms(root / "data", n=128, size=96, seed=0, overwrite=True)  # an interrupted one is redone
    if not splits.is_file():
        save_split(make_split(read_manifest(manifest), labeled_fraction=labeled, seed=0), splits)
    return manifest, splits


def _extra_test(n: int) -> Path:
    """Manifest of `n` phantoms from generator seed 1 (disjoint from the seed-0 training set), all in `test`."""
    import csv

    from dusss.data.synth import generate_phantoms

    root = RUNS / f"extra_test_{n}"
    manifest = root / "manifest_test.csv"
    if not manifest.is_file():
        src = generate_phantoms(root, n=n, size=96, seed=1, overwrite=True)
        with open(src, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            row["split"] = "test"
        with open(manifest, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return manifest


def run_cell(method: str, seed: int, epochs: int, extra: dict[str, Any], tag: str, threads: int,
             labeled: float = 0.25, vlm: str = "vit16", extra_test: int = 0) -> dict[str, Any]:
    """Train (or reuse) one run and evaluate its best-val model on test. Text-guided methods use the frozen
    VLM variant `vlm` of benchmarks/text_mask.py, pre-trained once on these training images and reports."""
    from dusss.engine.evaluate import evaluate_run
    from dusss.engine.logging import read_metrics, val_stability
    from dusss.engine.train import load_train_config, run_train
    from dusss.methods.segmentation import SEG_METHODS

    manifest, splits = _data(RUNS, labeled)
    if SEG_METHODS[method].needs_vlm:
        from text_mask import pretrain_vlm

        extra = {"vlm": str(pretrain_vlm(vlm, manifest, threads)), **extra}
    frac = "" if labeled == 0.25 else f"_l{round(labeled * 100)}"
    out = RUNS / f"{method}{tag}{frac}_s{seed}"
    overrides = {"data": str(manifest), "splits": str(splits), "out": str(out), "method": method,
                 "epochs": epochs, "batch_size": 8, "image_size": 96, "lr": LR, "seed": seed,
                 "patience": epochs, "threads": threads, "progress": False, "unet.base_width": 16, **extra}
    cfg = load_train_config(None, overrides)
    if not (out / "DONE").is_file():
        resume = (out / "state.safetensors").is_file()
        run_train(cfg, overwrite=not resume, resume=resume)
    seconds = float((out / "DONE").read_text().split()[0])  # training seconds, written by run_train
    ev = evaluate_run(out, manifest, split="test", overwrite=True)  # re-scored on every call
    rows = read_metrics(out / "metrics.jsonl")
    stab = val_stability(rows)
    best_row = max(rows, key=lambda r: float(r["val/dice"]))  # the first best, as val_stability
    more = {}
    if extra_test:
        ex = evaluate_run(out, _extra_test(extra_test), split="test", out=out / f"eval_extra{extra_test}",
                          overwrite=True)
        more = {"extra_test_dice": ex["dice"], "extra_test_n": int(ex["n_images"] - ex.get("n_empty", 0))}
    return {**more, "method": method + tag + frac, "seed": seed, "labeled": labeled, "test_dice": ev["dice"],
            "test_iou": ev["iou"], **stab, "epochs": len(rows), "seconds": seconds,
            "pseudo_at_best": {k: v for k, v in best_row.items() if k.startswith("pseudo/")},
            "pseudo": {k: v for k, v in rows[-1].items() if k.startswith("pseudo/")}}


def _fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(cells: list[dict[str, Any]]) -> str:
    extra = all("extra_test_dice" in c for c in cells)
    header = ("| method | test Dice" + (f" | test Dice, {cells[0]['extra_test_n']} new phantoms" if extra else "")
              + " | best val | final val | drop from best | pseudo-label Dice, final: teacher / text / merged | steps"
              " | s / run |")
    lines = [header, "|---" * (8 + extra) + "|"]
    for m in dict.fromkeys(c["method"] for c in cells):
        cs = [c for c in cells if c["method"] == m]
        pseudo = " / ".join(_fmt([c["pseudo"][k] for c in cs]) if all(k in c["pseudo"] for c in cs) else "–"
                            for k in ("pseudo/teacher_dice", "pseudo/text_dice", "pseudo/merged_dice"))
        ext = f" {_fmt([c['extra_test_dice'] for c in cs])} |" if extra else ""
        lines.append(f"| {m} | {_fmt([c['test_dice'] for c in cs])} |{ext} {_fmt([c['best_val'] for c in cs])} | "
                     f"{_fmt([c['final_val'] for c in cs])} | {_fmt([c['drop'] for c in cs])} | {pseudo} | "
                     f"{cs[0]['steps']} | {statistics.mean(c['seconds'] for c in cs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="supervised,mt,unimatch")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--labeled", type=float, default=0.25, help="labeled fraction of the training rows")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    ap.add_argument("--tag", default="", help="suffix of the run names (for --set variants)")
    ap.add_argument("--vlm", default="vit16", help="VLM variant of benchmarks/text_mask.py for dusss / amvlm")
    ap.add_argument("--extra-test", type=int, default=0, metavar="N",
                    help="also test every best-val model on N phantoms of generator seed 1 (0 = off)")
    ap.add_argument("--out", default=str(RESULTS / "phantom_ssl.json"))
    args = ap.parse_args(argv)
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cells = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            cell = run_cell(method, seed, args.epochs, extra, args.tag, args.threads, args.labeled, args.vlm,
                            args.extra_test)
            cells.append(cell)
            print(json.dumps({k: cell[k] for k in ("method", "seed", "test_dice", "best_val", "final_val", "steps")}),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cells": cells, "set": extra, "epochs": args.epochs,
                                          "command": " ".join(["python benchmarks/phantom_ssl.py", *(argv or sys.argv[1:])])},
                                         indent=2))
    print(table(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
