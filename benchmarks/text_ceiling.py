"""How much can a report's words repair a pseudo-label at all? (issue 14: the ceiling of "merged ≥ teacher + 0.03")

    python benchmarks/text_ceiling.py RUN [RUN ...]          # trained `dusss train` run folders
    python benchmarks/text_ceiling.py runs/demo/supervised runs/demo/mt runs/demo/dusss --results /tmp/c.json

For each run folder, its best-val model (RUN/model.safetensors) predicts the images of one split of the run's
own manifest and split file (`--split`, default `unlabeled`: the images a pseudo-label is made for; the phantom
set keeps their masks hidden in the manifest). Each prediction is scored by
`dusss.engine.text_eval.report_ceiling` against an oracle that knows the phantom report exactly (which lung
zones hold lesions, and "No pulmonary infection."): the prediction as it is, cut to the named (lung, zone)
cells, and reduced to its connected components that touch a named cell. That oracle is the best any text mask
can do with the information in a QaTa-style report; it cannot draw an outline the segmenter missed. Mean ± std
over the runs of one name (the folder name without a trailing `_s<seed>`), Dice over lesion images (the pinned
protocol's `empty_policy="skip"`), and the share of lesion-free images on which the prediction has foreground.

Writes `--results` (default benchmarks/results/text_ceiling.json; refuses to replace a file without
`--overwrite`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("pseudo", "cells", "components", "false_positive")


def run_scores(run: Path, split_name: str, threshold: float) -> dict[str, float]:
    """Mean `report_ceiling` scores of the run's best model over the split's images with masks."""
    import torch
    import yaml

    from dusss.data.manifest import read_manifest
    from dusss.data.readers import read_image, read_mask
    from dusss.data.splits import load_split
    from dusss.engine.predict import predict_probability
    from dusss.engine.text_eval import report_ceiling
    from dusss.engine.train import load_segmentation_model

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    records = read_manifest(cfg["data"])
    keys = set(load_split(cfg["splits"], records)[split_name])
    model, _ = load_segmentation_model(run / "model.safetensors")
    model.eval()
    rows: dict[str, list[float]] = {k: [] for k in KEYS}
    for rec in records:
        if rec.key not in keys or rec.mask is None:
            continue
        prob = predict_probability(model, read_image(rec.image), int(cfg["image_size"]), torch.device("cpu"))
        for k, v in report_ceiling(prob, read_mask(rec.mask), threshold).items():
            if not np.isnan(v):
                rows[k].append(v)
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in rows.items()}
    out.update(n_lesion=float(len(rows["pseudo"])), n_lesion_free=float(len(rows["false_positive"])))
    return out


def group_name(run: Path) -> str:
    return re.sub(r"_s\d+$", "", run.name)


def summarize(per_run: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """{group: {key: [mean, std], runs: n}} over the runs of each group (std 0 for one run)."""
    groups: dict[str, list[dict[str, float]]] = {}
    for run, scores in per_run.items():
        groups.setdefault(group_name(Path(run)), []).append(scores)
    out: dict[str, dict[str, Any]] = {}
    for name, rows in groups.items():
        cell: dict[str, Any] = {"runs": len(rows)}
        for k in (*KEYS, "gain"):
            vals = [r["components"] - r["pseudo"] if k == "gain" else r[k] for r in rows]
            cell[k] = [float(np.mean(vals)), float(np.std(vals))]
        out[name] = cell
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    def f(v: list[float]) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f}"

    header = ("| runs | n | pseudo-label Dice | cut to named cells | components touching them | ceiling gain "
              "| foreground on lesion-free images |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, c in summary.items():
        lines.append(f"| {name} | {c['runs']} | {f(c['pseudo'])} | {f(c['cells'])} | {f(c['components'])} "
                     f"| {c['gain'][0]:+.3f} ± {c['gain'][1]:.3f} | {f(c['false_positive'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="`dusss train` run folders")
    ap.add_argument("--split", default="unlabeled", choices=("labeled", "unlabeled", "val", "test"))
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--results", default=str(RESULTS / "text_ceiling.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --results file")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if results.exists() and not args.overwrite:
        print(f"error: {results}: exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    for r in args.runs:
        for name in ("config.yaml", "model.safetensors"):
            if not (Path(r) / name).is_file():
                print(f"error: {Path(r) / name}: not found (not a finished `dusss train` run)", file=sys.stderr)
                return 2
    per_run = {}
    for r in args.runs:
        per_run[r] = run_scores(Path(r), args.split, args.threshold)
        print(r, json.dumps({k: round(v, 4) for k, v in per_run[r].items()}), flush=True)
    summary = summarize(per_run)
    print(table(summary))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"split": args.split, "threshold": args.threshold, "runs": per_run,
                                   "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
