"""Every registered Step-2 method in one `dusss compare` grid on the phantom set (issue 15's CPU check).

A thin caller of `dusss.engine.compare.run_compare` (the harness behind `dusss compare`): 128 phantoms at 48 px
(generator seed 0), the given label fractions and seeds, a U-Net of width 8, 16 epochs of batch 4 at lr 3e-3
(one epoch = one pass over the unlabeled stream: the same steps for every method), each method from its preset;
the text-guided methods share one small VLM per seed (a 2-layer ViT and a 2-layer text encoder, 4 epochs).
Prints OUT/table.md and writes benchmarks/results/phantom_compare.json (the table plus the wall time).

    python benchmarks/phantom_compare.py                       # every method, 25 % labels, seed 0
    python benchmarks/phantom_compare.py --labeled 0.25,0.5 --seeds 0,1,2 --out benchmarks/.runs/phantom_compare3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dusss.data.synth import generate_phantoms
from dusss.engine.compare import run_compare
from dusss.methods.segmentation import SEG_METHODS

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_compare.json"
TRAIN = {"epochs": 16, "batch_size": 4, "image_size": 48, "lr": 3e-3, "unet.base_width": 8, "device": "cpu",
         "semi.text_warmup_steps": 50}
VLM = {"epochs": 4, "batch_size": 16, "image_size": 48, "device": "cpu", "vlm.image.image_size": 48,
       "vlm.image.hidden_size": 64, "vlm.image.num_layers": 2, "vlm.image.num_heads": 2,
       "vlm.text.random_init": True, "vlm.text.num_layers": 2, "vlm.text.hidden_size": 64,
       "vlm.text.num_heads": 2, "vlm.text.intermediate_size": 128, "vlm.embed_dim": 32, "vlm.head_hidden": 64,
       "vlm.pdt_heads": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="", help="comma list (default: every registered method)")
    ap.add_argument("--labeled", default="0.25")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/.runs/phantom_compare")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m] or SEG_METHODS.names()
    out = Path(args.out)
    manifest = out / "data" / "manifest.csv"
    if not manifest.is_file():
        generate_phantoms(out / "data", n=128, size=48, seed=0)
    t0 = time.time()
    table = run_compare(manifest, methods, [float(v) for v in args.labeled.split(",")],
                        [int(v) for v in args.seeds.split(",")], out / "grid",
                        overrides={**TRAIN, "threads": args.threads}, pretrain_overrides=VLM, progress=False)
    wall = time.time() - t0
    print((out / "grid" / "table.md").read_text())
    print(f"wall time of this call: {wall:.0f} s")
    Path(args.results).write_text(json.dumps({"command": "python benchmarks/phantom_compare.py "
                                              f"--labeled {args.labeled} --seeds {args.seeds}",
                                              "threads": args.threads, "torch": torch.__version__,
                                              "wall_seconds_this_call": wall, "train": TRAIN, "vlm": VLM,
                                              "table": table}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
