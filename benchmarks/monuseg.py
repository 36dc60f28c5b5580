"""Real-data benchmark: MoNuSeg (LViT release, per-image texts) with the DuSSS paper's protocol.

    python benchmarks/monuseg.py                  # full: 3 seeds x 7 rows (CPU-sized, see SIZES)
    python benchmarks/monuseg.py --quick          # smoke check: 1 seed, few epochs (<= 10 min on 2 CPU cores)
    python benchmarks/monuseg.py --device cuda    # same script on a GPU (recorded in the results)
    python benchmarks/monuseg.py --ablation       # Table 2 rows at 50 % labels (SSS / DCL / L_tg on/off)

Steps (a thin script over the library):
1. `import_lvit` on ../shared/datasets/monuseg_lvit, then every image/mask is resized ONCE to 128x128 (CPU
   budget; the paper: 224, `--image-size 224`; bilinear for both, mask then >= 0.5) into benchmarks/.cache/,
   with a manifest in the dusss contract. LViT's split is kept: 24 train / 6 val / 14 test.
2. 25 % and 50 % labeled splits of the 24 training images per seed (`make_split`), 100 % = all 24.
3. VLM pre-training (DuSSS objective: SSS + DCL) on the training images + texts (no masks), ONCE for all
   seeds (seed 0) -- the VLM is frozen in Step 2, so it is shared by every dusss run.
4. supervised 100/50/25 %, mt / unimatch / dusss 50/25 %, each from its preset (METHOD_PRESETS), the same
   optimizer steps for every run (no early stopping); val (6 images) for model selection only; the best-val
   checkpoint is evaluated once on test (14 images).
5. benchmarks/results/monuseg.json + a markdown table (test Dice / mIoU mean +- std over seeds) beside the
   paper's Table 1, the pseudo-label Dice (teacher / text / merged, best epoch) of the dusss runs on the
   unlabeled training images, the VLM's val retrieval, and wall time per run.

Resumable: a run folder with a DONE file (and bench.json) is not re-run; an interrupted run resumes
from its state.safetensors. Runs live in benchmarks/.runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC_DEFAULT = ROOT.parent / "shared" / "datasets" / "monuseg_lvit"
CACHE = ROOT / "benchmarks" / ".cache"
RUNS = ROOT / "benchmarks" / ".runs"
RESULTS = ROOT / "benchmarks" / "results"

# Table 1 of the paper, MoNuSeg (Dice / mIoU, %).
PAPER = {
    ("supervised", 1.0): (78.66, 68.46),
    ("mt", 0.25): (72.80, 56.70),
    ("mt", 0.5): (75.15, 59.64),
    ("dusss", 0.25): (76.51, 58.08),
    ("dusss", 0.5): (78.03, 66.93),
}
ROWS: tuple[tuple[str, float], ...] = (
    ("supervised", 1.0), ("supervised", 0.5), ("supervised", 0.25),
    ("mt", 0.5), ("mt", 0.25), ("unimatch", 0.5), ("unimatch", 0.25), ("dusss", 0.5), ("dusss", 0.25),
)
# Table 2 switches at 50 % labels: (name, sss, dcl, tg_weight).
ABLATION: tuple[tuple[str, bool, bool, float], ...] = (
    ("full (SSS+DCL+L_tg)", True, True, 1.0),
    ("w/o SSS", False, True, 1.0),
    ("w/o DCL", True, False, 1.0),
    ("w/o L_tg", True, True, 0.0),
    ("w/o SSS, DCL, L_tg", False, False, 0.0),
)


@dataclass(frozen=True)
class Size:
    """How big each stage is (CPU-sized by default; the paper trains a 14.75 M U-Net far longer)."""

    image_size: int = 128  # the paper: 224 (4.5 s/step at 224 on the shared 2-core CPU; 128 is ~3x cheaper)
    unet_width: int = 16
    train_epochs: int = 60  # 5 steps an epoch at 25 % / 50 % labels (one pass over the unlabeled stream)
    patience: int = 60  # no early stopping: every method gets the same optimizer steps
    batch_size: int = 4
    lr: float = 1e-3
    pretrain_epochs: int = 30  # 90 steps of batch 8 on the 24 training images
    pretrain_batch_size: int = 8
    seeds: int = 3


FULL = Size()
QUICK = Size(train_epochs=2, patience=2, pretrain_epochs=1, seeds=1)


def log(msg: str) -> None:
    print(f"[monuseg {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data
def prepare_data(src: Path, size: int) -> Path:
    """LViT folder -> manifest (import_lvit) -> images/masks resized once to `size` in the cache. Returns the manifest."""
    import numpy as np
    from PIL import Image

    from dusss.data.lvit import import_lvit
    from dusss.data.manifest import read_manifest, write_manifest
    from dusss.data.readers import read_image, read_mask

    out = CACHE / f"monuseg_{size}"
    manifest = out / "manifest.csv"
    if manifest.is_file():
        return manifest
    t = time.time()
    imported = CACHE / "monuseg_lvit_import"
    report = import_lvit(src, imported, overwrite=True)  # the cache's own import (a size change redoes it)
    problems = report.images_without_text + report.images_without_mask + report.texts_without_image
    if problems:
        raise SystemExit(f"{src}: import found unmatched files: {problems[:5]}")
    rows = []
    for r in read_manifest(report.manifest):
        img = read_image(r.image)  # float32 [H,W,3] in [0,1]
        im8 = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
        im8 = im8.resize((size, size), Image.Resampling.BILINEAR)
        assert r.mask is not None
        m = Image.fromarray(read_mask(r.mask) * 255).resize((size, size), Image.Resampling.BILINEAR)
        # Bilinear, then >= 0.5. (LViT's `> 0` would dilate every nucleus: at 128 px it turns the 28 %
        # foreground of the 1000 px masks into 61 %, a different task; >= 0.5 keeps ~28 %.)
        m = (np.asarray(m) >= 128).astype(np.uint8) * 255
        rel_i, rel_m = f"{r.split}/img/{r.case_id}.png", f"{r.split}/mask/{r.case_id}.png"
        (out / r.split / "img").mkdir(parents=True, exist_ok=True)
        (out / r.split / "mask").mkdir(parents=True, exist_ok=True)
        im8.save(out / rel_i)
        Image.fromarray(m).save(out / rel_m)
        rows.append({"image": rel_i, "mask": rel_m, "text": r.text, "split": r.split, "case_id": r.case_id})
    write_manifest(manifest, rows)
    log(f"imported {report.counts} from {src} and resized to {size}px in {time.time() - t:.0f} s -> {manifest}")
    return manifest


def split_path(manifest: Path, fraction: float, seed: int) -> Path:
    from dusss.data.manifest import read_manifest
    from dusss.data.splits import make_split, save_split

    p = CACHE / "splits" / f"frac{round(fraction * 100)}_seed{seed}.json"
    if not p.is_file():
        save_split(make_split(read_manifest(manifest), fraction, seed, source=manifest), p)
    return p


# ----------------------------------------------------------------------------------------------- runs
def pretrain_vlm(manifest: Path, size: Size, device: str, root: Path, seed: int = 0, sss: bool = True,
                 dcl: bool = True, name: str = "vlm") -> tuple[Path, dict[str, Any]]:
    from dusss.engine.pretrain import PretrainConfig, run_pretrain
    from dusss.methods.pretrain import PretrainObjectiveConfig
    from dusss.models.vlm import VLMConfig

    run = root / name
    ckpt = run / "vlm.safetensors"
    if not (run / "DONE").is_file():
        vlm_cfg = VLMConfig()
        vlm_cfg.image.image_size = size.image_size
        cfg = PretrainConfig(data=str(manifest), out=str(run), method="dusss", epochs=size.pretrain_epochs,
                             batch_size=size.pretrain_batch_size, image_size=size.image_size, seed=seed,
                             device=device, progress=False, vlm=vlm_cfg,
                             objective=PretrainObjectiveConfig(sss=sss, dcl=dcl))
        log(f"pre-training VLM {name} (sss={sss}, dcl={dcl}, {size.pretrain_epochs} epochs)")
        resume = (run / "state.safetensors").is_file()
        run_pretrain(cfg, overwrite=not resume, resume=resume)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    info = {"seconds": float((run / "DONE").read_text().split()[0]),
            "val_retrieval": {k: v for k, v in last.items() if k.startswith("val/")},
            "train_loss": last.get("train/loss"), "epochs": size.pretrain_epochs, "sss": sss, "dcl": dcl}
    return ckpt, info


def best_pseudo(metrics_jsonl: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in metrics_jsonl.read_text().splitlines() if x.strip()]
    if not rows:
        return {}
    best = rows[-1].get("best/epoch", rows[-1].get("epoch"))
    row = next((r for r in rows if r.get("epoch") == best), rows[-1])
    return {n: float(row[f"pseudo/{n}_dice"]) for n in ("teacher", "text", "merged") if f"pseudo/{n}_dice" in row}


def train_one(manifest: Path, method: str, fraction: float, seed: int, size: Size, device: str, run: Path,
              vlm: Path | None, semi_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from dusss.engine.evaluate import evaluate_run
    from dusss.engine.train import load_train_config, run_train

    done = run / "DONE"
    bench = run / "bench.json"
    if done.is_file() and bench.is_file():
        return json.loads(bench.read_text())
    t0 = time.time()
    if not done.is_file():
        overrides = {"data": str(manifest), "splits": str(split_path(manifest, fraction, seed)), "out": str(run),
                     "method": method, "vlm": str(vlm) if vlm else "", "epochs": size.train_epochs,
                     "batch_size": size.batch_size, "image_size": size.image_size, "lr": size.lr,
                     "patience": size.patience, "device": device, "seed": seed, "progress": False,
                     "unet.base_width": size.unet_width,
                     **{f"semi.{k}": v for k, v in (semi_overrides or {}).items()}}
        # each method from its published preset (dusss train does the same)
        cfg = load_train_config(None, overrides)
        resume = (run / "state.safetensors").is_file()
        log(f"train {run.name}{' (resume)' if resume else ''}")
        run_train(cfg, overwrite=not resume, resume=resume)
    train_s = float(done.read_text().split()[0])
    ev = evaluate_run(run, manifest, split="test", device=device, overwrite=True)  # re-scored on every call
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    result = {"method": method, "fraction": fraction, "seed": seed, "run": str(run.relative_to(ROOT)),
              "test_dice": ev["dice"], "test_miou": ev["iou"], "test_hd95": ev.get("hd95"),
              "best_val_dice": rows[-1].get("best/val_dice"), "best_epoch": rows[-1].get("best/epoch"),
              "final_val_dice": rows[-1].get("val/dice"), "steps": rows[-1].get("step"),
              "epochs_run": rows[-1].get("epoch"), "train_seconds": train_s,
              "wall_seconds_this_call": time.time() - t0, "pseudo_label_dice": best_pseudo(run / "metrics.jsonl")}
    bench.write_text(json.dumps(result, indent=2))
    log(f"  {run.name}: test Dice {ev['dice']:.4f} mIoU {ev['iou']:.4f} (best val epoch {result['best_epoch']}, "
        f"{train_s:.0f} s) pseudo {result['pseudo_label_dice']}")
    return result


# ----------------------------------------------------------------------------------------------- report
def _ms(xs: list[float]) -> str:
    xs = [100.0 * x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def aggregate(runs: list[dict[str, Any]], key=lambda r: (r["method"], r["fraction"])) -> dict[Any, dict[str, Any]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    out = {}
    for k, rs in groups.items():
        agg: dict[str, Any] = {"n_seeds": len(rs), "seeds": [r["seed"] for r in rs]}
        for m in ("test_dice", "test_miou", "train_seconds", "best_val_dice", "final_val_dice"):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if not vals:
                continue
            agg[m] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "values": vals}
        pls = [r["pseudo_label_dice"] for r in rs if r["pseudo_label_dice"]]
        if pls:
            agg["pseudo_label_dice"] = {n: {"mean": statistics.mean([p[n] for p in pls if n in p]),
                                            "values": [p[n] for p in pls if n in p]}
                                        for n in ("teacher", "text", "merged") if any(n in p for p in pls)}
        out[k] = agg
    return out


def table(runs: list[dict[str, Any]], size: Size) -> str:
    agg = aggregate(runs)
    lines = [("| method | labels | test Dice (%) | test mIoU (%) | paper Dice / mIoU | seeds | "
              "best / final val Dice (%) | pseudo-label Dice teacher / text / merged (%) | steps | train s / run |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, f in ROWS:
        rs = [r for r in runs if r["method"] == m and r["fraction"] == f]
        if not rs:
            continue
        paper = PAPER.get((m, f))
        pl = agg[(m, f)].get("pseudo_label_dice")
        pl_s = " / ".join(f"{100 * pl[n]['mean']:.1f}" for n in ("teacher", "text", "merged") if n in pl) if pl else "-"
        name = {"supervised": "U-Net (supervised)", "mt": "MT", "unimatch": "UniMatch", "dusss": "DuSSS"}[m]
        lines.append(f"| {name} | {int(f * 100)} % | {_ms([r['test_dice'] for r in rs])} | "
                     f"{_ms([r['test_miou'] for r in rs])} | "
                     f"{f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '-'} | {len(rs)} | "
                     f"{_ms([r.get('best_val_dice') for r in rs])} / {_ms([r.get('final_val_dice') for r in rs])} | "
                     f"{pl_s} | {rs[0].get('steps', '-')} | {statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    lines.append("")
    lines.append(f"U-Net base_width {size.unet_width} (paper: 64, 14.75 M params), {size.image_size}px, "
                 f"≤ {size.train_epochs} epochs (patience {size.patience} on val Dice), batch {size.batch_size}, "
                 f"lr {size.lr}; VLM pre-trained {size.pretrain_epochs} epochs.")
    return "\n".join(lines)


def ablation_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| variant (50 % labels) | test Dice (%) | test mIoU (%) | pseudo teacher / text / merged (%) | seeds |",
             "|---|---|---|---|---|"]
    for name, *_ in ABLATION:
        rs = [r for r in runs if r.get("variant") == name]
        if not rs:
            continue
        pls = [r["pseudo_label_dice"] for r in rs if r["pseudo_label_dice"]]
        pl_s = " / ".join(f"{100 * statistics.mean(p[n] for p in pls):.1f}" for n in ("teacher", "text", "merged")
                          if pls and all(n in p for p in pls)) or "-"
        lines.append(f"| {name} | {_ms([r['test_dice'] for r in rs])} | {_ms([r['test_miou'] for r in rs])} | "
                     f"{pl_s} | {len(rs)} |")
    return "\n".join(lines)


def earlier_runs(paths: list[Path], size: Size, have: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs recorded in earlier results JSONs (same size, seeds aside) that `have` has no run of."""
    seen = {(r["method"], r["fraction"], r["seed"]) for r in have}
    out: list[dict[str, Any]] = []
    mine = {k: v for k, v in size.__dict__.items() if k != "seeds"}
    for path in paths:
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {path}: cannot read an earlier results JSON ({e})") from None
        theirs = {k: v for k, v in earlier.get("size", {}).items() if k != "seeds"}
        if theirs != mine:
            diff = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise SystemExit(f"error: {path}: its runs have another size ({', '.join(diff)} differ); "
                             "pass the same --epochs/--patience/--lr/--width/--image-size")
        for r in earlier.get("runs", []):
            key = (r["method"], r["fraction"], r["seed"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke check: 1 seed, few epochs")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ap.add_argument("--ablation", action="store_true", help="also run the Table 2 switches at 50 %% labels")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    ap.add_argument("--only-seeds", default="", help="comma list: train only these seeds (to run seeds in "
                                                      "parallel processes; tabulate with --report-only after)")
    ap.add_argument("--epochs", type=int, default=None, help="max training epochs per run")
    ap.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (val Dice)")
    ap.add_argument("--width", type=int, default=None, help="U-Net base width (paper 64)")
    ap.add_argument("--image-size", type=int, default=None, help="side in px (default 128; the paper: 224)")
    ap.add_argument("--lr", type=float, default=None, help="Step-2 AdamW lr (default 1e-3; a run folder per lr)")
    ap.add_argument("--rows", default="", help="comma list like supervised:1.0,dusss:0.25 (default: all rows)")
    ap.add_argument("--src", default=str(SRC_DEFAULT), help="the LViT-layout MoNuSeg folder")
    ap.add_argument("--results", default=None, help="results JSON (default benchmarks/results/monuseg.json; "
                                                      "--quick writes monuseg_quick.json under benchmarks/.runs)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tabulate the finished runs (DONE) of the --seeds seeds and write the results")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--with-runs", default="", help="comma list of earlier results JSONs: their runs join the table "
                                                    "for the (method, labels, seed) this call has no run of; their "
                                                    "size must equal this call's (seeds aside)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.seeds is not None:
        size = replace(size, seeds=args.seeds)
    if args.epochs is not None:
        size = replace(size, train_epochs=args.epochs, patience=min(size.patience, args.epochs))
    if args.patience is not None:
        size = replace(size, patience=args.patience)
    if args.image_size is not None:
        size = replace(size, image_size=args.image_size)
    if args.width is not None:
        size = replace(size, unet_width=args.width)
    if args.lr is not None:
        size = replace(size, lr=args.lr)
    rows = ROWS
    if args.rows:
        rows = tuple((m, float(f)) for m, f in (x.split(":") for x in args.rows.split(",")))
    root = RUNS / ("quick" if args.quick else "full") / (f"px{size.image_size}_w{size.unet_width}_e{size.train_epochs}"
                                                       + ("" if size.lr == FULL.lr else f"_lr{size.lr:g}"))
    results_path = Path(args.results) if args.results else (
        root / "monuseg_quick.json" if args.quick else RESULTS / "monuseg.json")

    t_all = time.time()
    manifest = prepare_data(Path(args.src), size.image_size)
    vlm, vlm_info = pretrain_vlm(manifest, size, args.device, root)
    log(f"VLM: {vlm_info['seconds']:.0f} s, val retrieval {vlm_info['val_retrieval']}")
    runs: list[dict[str, Any]] = []
    seeds = [int(x) for x in args.only_seeds.split(",")] if args.only_seeds else list(range(size.seeds))
    for seed in seeds:
        for method, frac in rows:
            run = root / f"{method}_{int(frac * 100)}_s{seed}"
            if args.report_only and not (run / "DONE").is_file():
                continue
            runs.append(train_one(manifest, method, frac, seed, size, args.device, run,
                                  vlm if method in ("dusss", "amvlm") else None))
            print(table(runs, size), flush=True)
    runs_from = [str(x) for x in args.with_runs.split(",") if x]
    runs += earlier_runs([Path(x) for x in runs_from], size, runs)
    ablation_runs: list[dict[str, Any]] = []
    ablation_vlms: dict[str, Any] = {}
    if args.ablation:
        for seed in range(size.seeds):
            for name, sss, dcl, tg in ABLATION:
                vname = f"vlm_sss{int(sss)}_dcl{int(dcl)}"
                run = root / f"ablation_{vname}_tg{tg:g}_s{seed}"
                if sss and dcl and tg == 1.0:
                    run = root / f"dusss_50_s{seed}"  # same config as the main dusss 50 % row
                if args.report_only and not (run / "DONE").is_file():
                    continue
                v, vi = (vlm, vlm_info) if (sss and dcl) else pretrain_vlm(manifest, size, args.device, root,
                                                                            sss=sss, dcl=dcl, name=vname)
                ablation_vlms[vname] = vi
                r = train_one(manifest, "dusss", 0.5, seed, size, args.device, run, v, {"tg_weight": tg})
                ablation_runs.append({**r, "variant": name})
        print(ablation_table(ablation_runs), flush=True)

    total = time.time() - t_all
    from dusss import __version__ as dusss_version

    out = {
        "benchmark": "MoNuSeg (LViT release: 24 train / 6 val / 14 test, per-image texts), DuSSS paper Table 1",
        "command": "python benchmarks/monuseg.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "dusss": dusss_version,
        "size": size.__dict__,
        "protocol": {"image_size": size.image_size, "resize": "bilinear image; mask bilinear then >= 0.5 (LViT uses > 0, which dilates nuclei at low resolution)",
                     "model_selection": "best val Dice (6 val images); test evaluated once per run",
                     "vlm_pretraining": "once (seed 0) on the 24 training images + texts, no masks; shared by all "
                                        "dusss runs", "metric": "per-image Dice / IoU at 0.5, mean over 14 test images"},
        "paper": {f"{m}_{int(f * 100)}": {"dice": d, "miou": i} for (m, f), (d, i) in PAPER.items()},
        "vlm": vlm_info,
        "rows": {f"{m}_{int(f * 100)}": v for (m, f), v in aggregate(runs).items()},
        "runs": runs,
        "runs_from": runs_from,
        "ablation": {"vlms": ablation_vlms, "rows": {k: v for k, v in aggregate(
            ablation_runs, key=lambda r: r["variant"]).items()}, "runs": ablation_runs} if args.ablation else None,
        "total_wall_seconds_this_call": total,
        "total_train_seconds": sum(r["train_seconds"] for r in runs) + vlm_info["seconds"],
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(table(runs, size))
    log(f"done in {total:.0f} s; results -> {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
