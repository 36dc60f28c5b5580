"""Share of a training run's time spent outside the optimizer steps (issue 16, item 7).

Trains `supervised` and `mt` for 24 epochs on 128 phantoms at 64 px (25 % labels, U-Net width 16, batch 8:
the demo's sizes, with the default curves policy) through `run_train`, then compares the run's `DONE`
seconds with the sum of its logged `seconds_per_epoch` (the optimizer steps). Prints a table and writes
benchmarks/results/loop_overhead.json. About 70 s on one thread.

    python benchmarks/loop_overhead.py [--threads 1] [--out /tmp/loop_overhead]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from dusss.data.manifest import read_manifest
from dusss.data.splits import make_split, save_split
from dusss.data.synth import generate_phantoms
from dusss.engine.logging import read_metrics
from dusss.engine.train import load_train_config, run_train

RESULTS = Path(__file__).resolve().parent / "results" / "loop_overhead.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/.runs/loop_overhead", help="scratch folder (replaced)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    manifest = generate_phantoms(root / "data", n=128, size=64, seed=0)
    save_split(make_split(read_manifest(manifest), labeled_fraction=0.25, seed=0), root / "splits.json")
    rows = []
    for name in ("supervised", "mt"):
        cfg = load_train_config(None, {"data": str(manifest), "splits": str(root / "splits.json"),
                                       "out": str(root / name), "method": name, "epochs": 24, "batch_size": 8,
                                       "image_size": 64, "lr": 1e-3, "seed": 0, "patience": 24, "progress": False,
                                       "unet.base_width": 16, "threads": args.threads})
        t0 = time.time()
        run_train(cfg)
        wall = time.time() - t0
        steps = sum(r["seconds_per_epoch"] for r in read_metrics(root / name / "metrics.jsonl"))
        run_s = float((root / name / "DONE").read_text())
        rows.append({"method": name, "wall_s": wall, "run_s": run_s, "steps_s": steps,
                     "outside_share": 1 - steps / run_s})
    print("| method | run s | in steps s | outside the steps |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['run_s']:.1f} | {r['steps_s']:.1f} | {100 * r['outside_share']:.1f} % |")
    Path(args.results).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
