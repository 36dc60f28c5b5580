"""`dusss demo`: the whole method end to end on the embedded phantom set, with an HTML report.

synth → 25 % labeled split → [VLM pre-training (DuSSS) → dusss] beside [supervised → mt] → evaluate → report.
The two chains are independent, so on a machine with 2 or more cores they run in two processes at once
(`lanes`), each with half the cores; a small U-Net gains little from a second intra-op thread, so this is
about 1.4x faster than one process at 2 threads. Sizes are chosen for 2 CPU cores: the full demo in about
4 minutes, `quick` in about one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dusss.atomic import atomic_write_text
from dusss.runfiles import RunFiles

DEMO_METHODS = ("supervised", "mt", "dusss")
# What a demo writes into its folder: only a folder holding nothing else is replaced by `overwrite`.
DEMO_ENTRIES = frozenset({"data", "splits.json", "vlm", *DEMO_METHODS, "report.html", "summary.json"})
# Demo-only Step-2 settings on top of each method's preset (dotted TrainConfig keys).
# dusss: a faster EMA teacher (0.95) than the paper-scale 0.99, whose teacher still lags ~100 of the 192 steps
# (its pseudo-label Dice was 0.03 at 0.99 in the demo); 100 text-mask warm-up steps instead of 300 (time).
# Sub-reports: the phantom reports are `caption_mask`'s QaTa style (text Dice 0.55 with, 0.40 without).
# AdamW lr of Step 2: 3e-3, chosen on val Dice of `supervised` at benchmarks/phantom_ssl.py's size (1e-3 left the
# training loss at 0.49 after 320 steps and the network under-confident: docs/benchmarks.md, session 9).
DEMO_LR = 3e-3
DEMO_SEMI: dict[str, dict[str, object]] = {"dusss": {"semi.ema_decay": 0.95, "semi.text_warmup_steps": 100,
                                                     "semi.text_sub_reports": 0.5}}


@dataclass(frozen=True)
class DemoSize:
    """How big each stage of the demo is."""

    n_images: int
    image_size: int
    pretrain_epochs: int
    train_epochs: int
    unet_width: int
    batch_size: int


# 256 phantoms: 24 epochs of 15 steps (one pass over the 115 unlabeled images) = 360 steps at 64 px and lr 3e-3,
# and a 51-image test split (39 labeled, 51 val). At one thread per lane a step costs half what it cost at two threads in one process
# (the small U-Net loses to the threading overhead), so twice the data and steps of the 128-phantom demo (192
# steps, 110 s in two lanes) fit the 5-minute budget (docs/benchmarks.md). `unimatch` (4.5x a supervised step)
# is left to benchmarks/phantom_ssl.py.
FULL = DemoSize(n_images=256, image_size=64, pretrain_epochs=4, train_epochs=24, unet_width=16, batch_size=8)
QUICK = DemoSize(n_images=48, image_size=64, pretrain_epochs=2, train_epochs=3, unet_width=8, batch_size=8)


def demo_configs(out: Path, size: DemoSize, seed: int) -> tuple[Any, dict[str, Any]]:
    """The pre-training config and the per-method training configs of the demo."""
    from dusss.engine.pretrain import PretrainConfig
    from dusss.engine.train import load_train_config
    from dusss.methods.segmentation import SEG_METHODS
    from dusss.models.vlm import VLMConfig

    manifest = str(out / "data" / "manifest.csv")
    vlm_cfg = VLMConfig()
    # The ImageNet EfficientNet-Lite0: its tokens gave the better text-guided mask (benchmarks/text_mask.py).
    vlm_cfg.image.kind = "efficientnet_lite0"
    vlm_cfg.image.image_size = size.image_size
    # The ImageNet EfficientNet-Lite0 (the default image encoder) at encoder_lr, the heads at 1e-4
    # (benchmarks/text_mask.py's setting).
    pre = PretrainConfig(data=manifest, out=str(out / "vlm"), method="dusss", epochs=size.pretrain_epochs,
                         batch_size=16, image_size=size.image_size, lr=1e-4, seed=seed, vlm=vlm_cfg)
    trains = {}
    for method in DEMO_METHODS:
        overrides = {
            "data": manifest, "splits": str(out / "splits.json"), "out": str(out / method), "method": method,
            "vlm": str(RunFiles(out / "vlm").vlm) if SEG_METHODS[method].needs_vlm else "",
            "epochs": size.train_epochs, "batch_size": size.batch_size, "image_size": size.image_size,
            "seed": seed, "lr": DEMO_LR, "patience": max(size.train_epochs, 1),  # no early stop: equal steps
            "unet.base_width": size.unet_width, "curves_every": 0, "pseudo_label_eval_max": 32,
            **DEMO_SEMI.get(method, {})}
        # every method from its published preset (as `dusss train` does), then the demo's sizes
        trains[method] = load_train_config(None, overrides)
    return pre, trains


def _run_chain(stages: list[tuple[str, Any]], threads: int, lane: str) -> dict[str, float]:
    """Run `stages` ((name, PretrainConfig or TrainConfig), in order) at `threads` torch threads; returns the
    seconds of each. A top-level function, so that a spawned process can run it."""
    import torch

    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.engine.train import run_train

    torch.set_num_threads(threads)
    seconds: dict[str, float] = {}
    for name, cfg in stages:
        print(f"  {lane}: {name} started", flush=True)
        t = time.time()
        if isinstance(cfg, PretrainConfig):
            run_pretrain(cfg, overwrite=True)
        else:
            run_train(cfg, overwrite=True)
        seconds[name] = time.time() - t
        print(f"  {lane}: {name} done in {seconds[name]:.0f} s", flush=True)
    return seconds


def demo_lanes() -> int:
    """How many processes the demo trains in: 2 on a machine with 2 or more cores, else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _train_all(pre: Any, trains: dict[str, Any], lanes: int) -> dict[str, float]:
    """Pre-train the VLM and train every demo method; returns the seconds per stage ("vlm" and each method).

    With `lanes` 2 the chains [VLM → dusss] and [supervised → mt] run in two spawned processes at once, each
    with half the cores (each run is seeded and single-process, so its numbers do not depend on the other);
    with 1 they run one after the other here, progress bars on."""
    chains = [[("vlm", pre), ("dusss", trains["dusss"])], [(m, trains[m]) for m in DEMO_METHODS if m != "dusss"]]
    if lanes <= 1:
        import torch

        return _run_chain(chains[0] + chains[1], torch.get_num_threads(), "lane 1")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    threads = max(1, (os.cpu_count() or 2) // 2)
    # two progress bars from two processes would overwrite each other: one line per stage instead
    chains = [[(name, replace(cfg, progress=False)) for name, cfg in chain] for chain in chains]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_chain, chain, threads, f"lane {i + 1}") for i, chain in enumerate(chains)]
        seconds: dict[str, float] = {}
        for future in futures:
            seconds.update(future.result())  # re-raises a stage's error here
    return seconds


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, overwrite: bool = True,
             lanes: int | None = None) -> dict[str, Any]:
    """Run the demo into `out`; returns the summary written to OUT/summary.json. `lanes`: processes to train
    in (1 or 2; default `demo_lanes()`)."""
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split
    from dusss.data.synth import generate_phantoms
    from dusss.engine.evaluate import evaluate_run
    from dusss.engine.logging import read_metrics, val_stability

    t0 = time.time()
    out = Path(out)
    if out.exists() and overwrite:
        _check_demo_folder(out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    size = QUICK if quick else FULL
    lanes = demo_lanes() if lanes is None else max(1, min(int(lanes), 2))
    print(f"[1/4] phantom data: {size.n_images} images at {size.image_size}px")
    manifest = generate_phantoms(out / "data", n=size.n_images, size=size.image_size, seed=seed)
    split = make_split(read_manifest(manifest), labeled_fraction=0.25, seed=seed)
    save_split(split, out / "splits.json")
    pre, trains = demo_configs(out, size, seed)
    print(f"[2/4] pre-training the VLM (DuSSS: SSS + dual contrast), then dusss; supervised, then mt; "
          f"{size.train_epochs} epochs each, {'in 2 processes at once' if lanes > 1 else 'one after the other'}")
    timings = _train_all(pre, trains, lanes)
    print("[3/4] evaluating on the test split")
    results: dict[str, dict[str, float]] = {}
    for method in DEMO_METHODS:
        ev = evaluate_run(out / method, manifest, split="test")
        results[method] = {"dice": ev["dice"], "miou": ev["iou"], "hd95": ev.get("hd95", float("nan")),
                           **val_stability(read_metrics(RunFiles(out / method).metrics))}
    pseudo = _last_pseudo_label_dice(RunFiles(out / "dusss").metrics)
    summary = {"methods": results, "pseudo_label_dice": pseudo, "seconds": time.time() - t0,
               "train_seconds": {m: timings[m] for m in DEMO_METHODS}, "vlm_seconds": timings["vlm"],
               "lanes": lanes, "size": size.__dict__, "seed": seed}
    print("[4/4] report")
    from dusss.report.demo_report import write_demo_report

    write_demo_report(out, summary, manifest)
    summary["seconds"] = time.time() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(format_table(summary))
    return summary


def _check_demo_folder(out: Path) -> None:
    """DusssError unless `out` is a folder holding only what a demo writes (so replacing it loses nothing else)."""
    from dusss.errors import DusssError

    if not out.is_dir():
        raise DusssError(f"{out}: exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
    if foreign:
        raise DusssError(f"{out}: is not a dusss demo folder (it holds {foreign[0]!r}); "
                         "choose another --out, the demo replaces its folder")


def _last_pseudo_label_dice(metrics_jsonl: Path) -> dict[str, float]:
    """Pseudo-label Dice (teacher, text, merged) of the best epoch of the dusss run."""
    from dusss.engine.logging import read_metrics

    rows = read_metrics(metrics_jsonl)
    if not rows:
        return {}
    best_epoch = rows[-1].get("best/epoch", rows[-1].get("epoch"))
    row = next((r for r in rows if r.get("epoch") == best_epoch), rows[-1])
    return {name: float(row[f"pseudo/{name}_dice"]) for name in ("teacher", "text", "merged") if f"pseudo/{name}_dice" in row}


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text results table (printed at the end of the demo)."""
    lines = [f"{'method':<12}{'Dice':>8}{'mIoU':>8}{'HD95':>8}{'best val':>10}{'final val':>11}{'steps':>7}"]
    for m, r in summary["methods"].items():
        lines.append(f"{m:<12}{r['dice']:>8.4f}{r['miou']:>8.4f}{r.get('hd95', float('nan')):>8.2f}"
                     f"{r.get('best_val', float('nan')):>10.4f}{r.get('final_val', float('nan')):>11.4f}"
                     f"{r.get('steps', 0):>7}")
    pl = summary.get("pseudo_label_dice") or {}
    if pl:
        lines.append("pseudo-label Dice on unlabeled train images: " + ", ".join(f"{k} {v:.4f}" for k, v in pl.items()))
    lines.append(f"total {summary['seconds']:.0f} s")
    return "\n".join(lines)


__all__ = ["FULL", "QUICK", "demo_configs", "demo_lanes", "format_table", "run_demo"]
