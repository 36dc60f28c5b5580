"""`dusss compare`: every method on the same data, splits, backbone and metric protocol, over label fractions
and seeds, in one resumable grid (issue 15's harness; the paper's Table 1 is one call of it).

For each seed: a labeled split per fraction (`data.splits.make_split`, grouped by case), and, when a method needs
one, a VLM pre-trained once per pre-training method (`SegMethod.vlm_pretrain`: DuSSS's objective for `dusss`,
AMVLM's for `amvlm`; `PretrainConfig` defaults, or the `pretrain_config` file, on the training images and their
reports, no masks). For each cell (method, fraction, seed): `run_train` from the method's preset under
`train_config` and the overrides, the best-val model evaluated once on the test split. A cell whose run has
DONE and whose test evaluation exists is not re-run; an interrupted one resumes from its state.

OUT/table.json and OUT/table.md: test Dice / mIoU / HD95 mean ± std over seeds per (method, fraction), the
parameters and forward FLOPs of the network needed at inference (the paper's Complexity column; frozen
encoders of the text-conditioned baselines included), training seconds, best and last val Dice and
the drop between them (stability), the teacher's / text / merged pseudo-label Dice where there is one, and a
two-sided Wilcoxon signed-rank p-value of the `reference` method (default dusss, where it is in the grid)
against each other method on paired per-image test Dice (same fraction, all seeds pooled).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dusss.atomic import atomic_write_text
from dusss.errors import ConfigError
from dusss.runfiles import RunFiles


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    labeled: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_l{round(self.labeled * 100)}_s{self.seed}"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# the report a text-conditioned network is given when its FLOPs are counted (the README's example)
FLOPS_REPORT = "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."


def forward_flops(model: Any, image_size: int, text: str = FLOPS_REPORT) -> int:
    """FLOPs of one forward pass of `model` on a [1,3,S,S] image, with the report `text` for a text-conditioned
    network (its text encoder counted; torch's FlopCounterMode: 2 per multiply-add of the convolutions and
    matrix products; elementwise work not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dusss.models.networks import segment

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            segment(model, torch.zeros(1, 3, image_size, image_size), [text])
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def _per_image_dice(eval_dir: Path) -> dict[str, float]:
    with open(eval_dir / "per_image.csv", newline="") as fh:
        return {row["key"]: float(row["dice"]) for row in csv.DictReader(fh)}


def _finished(run: Path) -> bool:
    """A cell whose training has DONE and whose test evaluation has been written."""
    test = run / "eval" / "test"
    return RunFiles(run).done.is_file() and (test / "per_image.csv").is_file() and (test / "metrics.json").is_file()


def run_compare(data: str | Path, methods: list[str], labeled: list[float], seeds: list[int], out: str | Path,
                overrides: dict[str, Any] | None = None, train_config: str | Path | None = None,
                pretrain_config: str | Path | None = None, pretrain_overrides: dict[str, Any] | None = None,
                reference: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid and write OUT/table.json and OUT/table.md; returns the table."""
    from dusss.config import load_config
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split
    from dusss.engine.evaluate import evaluate_run
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.engine.train import load_train_config, run_train
    from dusss.methods.segmentation import SEG_METHODS

    for m in methods:
        SEG_METHODS.lookup(m)
    if not methods or not labeled or not seeds:
        raise ConfigError("compare needs at least one method, one labeled fraction and one seed")
    out = Path(out)
    records = read_manifest(data)
    cells = [Cell(m, f, s) for s in seeds for f in labeled for m in methods]
    t0, trained = time.time(), 0
    finished = [_finished(out / "runs" / c.name) for c in cells]
    for i, cell in enumerate(cells):
        run = out / "runs" / cell.name
        eval_dir = run / "eval" / "test"
        if finished[i]:
            continue
        split = out / "splits" / f"l{round(cell.labeled * 100)}_s{cell.seed}.json"
        if not split.is_file():
            save_split(make_split(records, cell.labeled, seed=cell.seed, source=data), split)
        vlm = ""
        if SEG_METHODS[cell.method].needs_vlm:
            # one VLM per seed and pre-training method (AMVLM's objective for `amvlm`, DuSSS's for `dusss`)
            objective = SEG_METHODS[cell.method].vlm_pretrain
            vlm_run = out / (f"vlm_s{cell.seed}" if objective == "dusss" else f"vlm_{objective}_s{cell.seed}")
            if not RunFiles(vlm_run).done.is_file():
                pcfg = load_config(PretrainConfig, pretrain_config,
                                   {"data": str(data), "out": str(vlm_run), "seed": cell.seed, "progress": progress,
                                    **(pretrain_overrides or {}), "method": objective})
                run_pretrain(pcfg, overwrite=False, resume=RunFiles(vlm_run).state.is_file())
            vlm = str(RunFiles(vlm_run).vlm)
        if progress:  # the grid at a glance: done / running / left, and the time per cell so far
            done = sum(finished)
            per = f", {(time.time() - t0) / trained:.0f} s per cell" if trained else ""
            print(f"compare: {done} done, running {cell.name}, {len(cells) - done - 1} left{per}", flush=True)
        if not RunFiles(run).done.is_file():
            cfg = load_train_config(train_config, {"data": str(data), "splits": str(split), "out": str(run),
                                                   "method": cell.method, "vlm": vlm, "seed": cell.seed,
                                                   "progress": progress, **(overrides or {})})
            run_train(cfg, overwrite=False, resume=RunFiles(run).state.is_file())
        evaluate_run(run, data, split="test", out=eval_dir, overwrite=True)
        finished[i], trained = True, trained + 1
    return write_table(out, methods, labeled, seeds, reference)


def write_table(out: str | Path, methods: list[str], labeled: list[float], seeds: list[int],
                reference: str | None = None) -> dict[str, Any]:
    """Tabulate the finished cells of a grid (trains nothing) into OUT/table.json and OUT/table.md; returns the
    table. Refuses, naming them, when cells of the grid have not finished (no DONE or no test evaluation)."""
    out = Path(out)
    cells = [Cell(m, f, s) for s in seeds for f in labeled for m in methods]
    missing = [c.name for c in cells if not _finished(out / "runs" / c.name)]
    if missing:
        raise ConfigError(f"{out}: {len(missing)} cell(s) of the grid have not finished: {', '.join(missing[:6])}"
                          + (", ..." if len(missing) > 6 else ""))
    table = _tabulate(out, methods, labeled, seeds, reference)
    atomic_write_text(out / "table.json", json.dumps(table, indent=2))
    atomic_write_text(out / "table.md", _markdown(table))
    return table


def _tabulate(out: Path, methods: list[str], labeled: list[float], seeds: list[int],
              reference: str | None) -> dict[str, Any]:
    from dusss.engine.logging import read_metrics, val_stability
    from dusss.engine.train import load_segmentation_model

    ref = reference or ("dusss" if "dusss" in methods else None)
    rows = []
    per_image: dict[tuple[str, float], dict[str, float]] = {}
    for method in methods:
        for frac in labeled:
            metrics, secs, pseudo, steps, params, flops, stab = [], [], {}, 0, 0, None, []
            for seed in seeds:
                run = out / "runs" / Cell(method, frac, seed).name
                ev = json.loads((run / "eval" / "test" / "metrics.json").read_text())
                metrics.append(ev)
                secs.append(float(RunFiles(run).done.read_text().split()[0]))
                log = read_metrics(RunFiles(run).metrics)
                stab.append(val_stability(log))
                steps = stab[-1]["steps"]
                for k, v in log[-1].items():
                    if k.startswith("pseudo/") and k.endswith("_dice"):
                        pseudo.setdefault(k.removeprefix("pseudo/"), []).append(float(v))
                for key, d in _per_image_dice(run / "eval" / "test").items():
                    per_image.setdefault((method, frac), {})[f"{seed}:{key}"] = d
                if flops is None:  # the network needed at inference, frozen encoders included
                    model, meta = load_segmentation_model(run, "cpu")
                    params = sum(p.numel() for p in model.parameters())
                    flops = forward_flops(model, int(meta["image_size"]))
            row: dict[str, Any] = {"method": method, "labeled": frac, "seeds": len(seeds), "steps": steps,
                                   "parameters": params, "flops": flops, "train_seconds": statistics.mean(secs)}
            for key in ("dice", "iou", "hd95"):
                row[key], row[f"{key}_std"] = _mean_std([float(m[key]) for m in metrics])
            for key in ("best_val", "final_val", "drop"):  # stability: the val Dice lost from the best epoch
                row[key], row[f"{key}_std"] = _mean_std([s[key] for s in stab])
            row["pseudo_label_dice"] = {k: statistics.mean(v) for k, v in pseudo.items()}
            rows.append(row)
    if ref is not None:
        from scipy.stats import wilcoxon

        for row in rows:
            if row["method"] == ref:
                continue
            a, b = per_image.get((ref, row["labeled"]), {}), per_image[(row["method"], row["labeled"])]
            keys = sorted(k for k in set(a) & set(b) if not (math.isnan(a[k]) or math.isnan(b[k])))
            diffs = [a[k] - b[k] for k in keys]
            row[f"wilcoxon_p_vs_{ref}"] = (float(wilcoxon([a[k] for k in keys], [b[k] for k in keys]).pvalue)
                                           if any(d != 0 for d in diffs) else 1.0)
    return {"reference": ref, "seeds": seeds, "labeled": labeled, "methods": methods, "rows": rows}


def _markdown(table: dict[str, Any]) -> str:
    ref = table["reference"]
    head = ["method", "labels", "test Dice", "test mIoU", "HD95 (px)", "pseudo-label Dice teacher / text / merged",
            "val Dice best / last", "parameters", "GFLOPs / image", "steps", "train s"] + ([f"Wilcoxon p vs {ref}"] if ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        pl = r["pseudo_label_dice"]
        pseudo = " / ".join(f"{pl[k]:.3f}" if k in pl else "–" for k in ("teacher_dice", "text_dice", "merged_dice"))
        cells = [r["method"], f"{r['labeled']:.0%}", f"{r['dice']:.3f} ± {r['dice_std']:.3f}",
                 f"{r['iou']:.3f} ± {r['iou_std']:.3f}", f"{r['hd95']:.2f} ± {r['hd95_std']:.2f}", pseudo,
                 f"{r['best_val']:.3f} / {r['final_val']:.3f}",
                 f"{r['parameters']:,}", f"{r['flops'] / 1e9:.3g}", str(r["steps"]), f"{r['train_seconds']:.0f}"]
        if ref:
            p = r.get(f"wilcoxon_p_vs_{ref}")
            cells.append("–" if p is None else f"{p:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(str(s) for s in table["seeds"])
    return ("\n".join(lines) + f"\n\nMean ± std over seeds {seeds}; each best-val model tested once on the test "
            "split (per-image Dice / IoU at 0.5, images with an empty ground truth skipped).\n")


__all__ = ["Cell", "forward_flops", "run_compare", "write_table"]
