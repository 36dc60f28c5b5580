"""Real-data benchmark: MoNuSeg (LViT release, per-image texts) with the DuSSS paper's protocol, through the
`dusss compare` harness (`dusss.engine.compare.run_compare`; no grid runner of its own).

    python benchmarks/monuseg.py                        # every registered method, seeds 0,1,2 (CPU size, see Size)
    python benchmarks/monuseg.py --quick                # smoke check: seed 0, 2 epochs, 1 VLM epoch
    python benchmarks/monuseg.py --methods supervised,mt,unimatch,dusss --seeds 0
    python benchmarks/monuseg.py --seeds 1 --no-table & python benchmarks/monuseg.py --seeds 2 --no-table
    python benchmarks/monuseg.py --report-only          # tabulate the finished cells, train nothing
    python benchmarks/monuseg.py --labeled 0.5          # the semi-supervised grid at 50 % labels only
    python benchmarks/monuseg.py --ablation             # Table 2 switches (SSS / DCL / L_tg) at 50 % labels
    python benchmarks/monuseg.py --device cuda          # same script on a GPU (recorded in the results)

Steps:
1. `import_lvit` on ../shared/datasets/monuseg_lvit, then every image/mask is resized ONCE to 128x128 (CPU
   budget; the paper: 224, `--image-size 224`; bilinear for both, mask then >= 0.5) into benchmarks/.cache/,
   with a manifest in the dusss contract. LViT's split is kept: 24 train / 6 val / 14 test.
2. Two grids of the harness, under benchmarks/.runs/monuseg/<size>/: `full` (100 % labels: supervised and the
   text-equipped baselines `clip` and `lvit`, which need the report at inference) and `semi` (every method
   but `clip` at 50 % and 25 % of the 24 training images, `make_split` per fraction and seed). The
   harness pre-trains one VLM per seed and pre-training objective where a method needs one (DuSSS's for
   `dusss`, AMVLM's for `amvlm`, CLIP's for `clip`; the training images and their texts, no masks), trains each cell from its
   method's preset with the same optimizer steps (no early stopping), selects on val (6 images) and tests each
   best-val model once (14 images). Resumable: finished cells are not re-run, an interrupted one resumes.
3. benchmarks/results/monuseg_compare.json (both grids' tables, the size, the protocol, the paper's numbers)
   and a markdown table: test Dice / mIoU mean +- std over seeds beside the paper's Table 1, best / last val
   Dice, pseudo-label Dice (teacher / text / merged), the Wilcoxon p-value against `dusss`, steps, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC_DEFAULT = ROOT.parent / "shared" / "datasets" / "monuseg_lvit"
CACHE = ROOT / "benchmarks" / ".cache"
RUNS = ROOT / "benchmarks" / ".runs" / "monuseg"
RESULTS = ROOT / "benchmarks" / "results" / "monuseg_compare.json"

# Table 1 of the DuSSS paper, MoNuSeg (Dice / mIoU, %), by (row name, labeled fraction); ../shared/METHOD.md §6.1.
PAPER = {
    ("supervised", 1.0): (78.66, 68.46), ("clip", 1.0): (79.79, 68.27), ("vilt", 1.0): (77.92, 67.81),
    ("mt", 0.25): (72.80, 56.70), ("cct", 0.25): (74.25, 56.55), ("bcp", 0.25): (72.06, 54.69),
    ("mcnet", 0.25): (71.53, 48.12), ("ssnet", 0.25): (71.80, 47.80), ("ucmt", 0.25): (75.53, 54.82),
    ("lvit", 0.25): (75.69, 56.14), ("dusss", 0.25): (76.51, 58.08),
    ("mt", 0.5): (75.15, 59.64), ("cct", 0.5): (76.23, 55.87), ("bcp", 0.5): (72.17, 50.88),
    ("mcnet", 0.5): (71.59, 48.75), ("ssnet", 0.5): (73.05, 49.88), ("ucmt", 0.5): (76.36, 59.29),
    ("lvit", 0.5): (76.57, 65.44), ("dusss", 0.5): (78.03, 66.93),
}
NAMES = {"supervised": "U-Net (supervised)", "mt": "MT", "unimatch": "UniMatch", "uamt": "UA-MT", "cct": "CCT",
         "cps": "CPS", "bcp": "BCP", "mcnet": "MC-Net", "ssnet": "SS-Net", "ucmt": "UCMT", "dusss": "DuSSS",
         "amvlm": "AMVLM", "clip": "CLIP", "vilt": "ViLT", "lvit": "LViT"}
SEMI_FRACTIONS = (0.5, 0.25)
# Fully supervised: the `full` grid (the paper's CLIP row is at 100 % only; its LViT rows are at 25 / 50 %, so
# `lvit` is in both grids: at 25 / 50 % it is the text-conditioned network on the labeled images alone)
FULL_METHODS = ("supervised", "clip", "lvit")
FULL_ONLY = ("clip",)
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

    @property
    def tag(self) -> str:
        """The folder of this size's runs (one per size, so that runs of two sizes never mix)."""
        return (f"px{self.image_size}_w{self.unet_width}_e{self.train_epochs}_p{self.patience}_b{self.batch_size}"
                f"_lr{self.lr:g}_v{self.pretrain_epochs}x{self.pretrain_batch_size}")


FULL = Size()
QUICK = Size(train_epochs=2, patience=2, pretrain_epochs=1)


def log(msg: str) -> None:
    print(f"[monuseg {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_overrides(size: Size, device: str, threads: int) -> dict[str, Any]:
    """Step-2 config keys every cell gets on top of its method's preset."""
    return {"epochs": size.train_epochs, "patience": size.patience, "batch_size": size.batch_size,
            "image_size": size.image_size, "lr": size.lr, "unet.base_width": size.unet_width, "device": device,
            "threads": threads}


def pretrain_overrides(size: Size, device: str, threads: int) -> dict[str, Any]:
    """Step-1 config keys of every VLM the harness pre-trains (one per seed and objective)."""
    return {"epochs": size.pretrain_epochs, "batch_size": size.pretrain_batch_size, "image_size": size.image_size,
            "vlm.image.image_size": size.image_size, "device": device, "threads": threads}


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


# ----------------------------------------------------------------------------------------------- report
def _pct(mean: float, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f}" + ("" if std is None or math.isnan(std) else f" ± {100 * std:.2f}")


def paper_table(tables: list[dict[str, Any]]) -> str:
    """Markdown: the harness's rows (test Dice / mIoU mean ± std over seeds, %) beside the paper's Table 1."""
    lines = [("| method | labels | test Dice (%) | test mIoU (%) | paper Dice / mIoU | seeds | best / last val Dice (%) "
              "| pseudo-label Dice teacher / text / merged (%) | Wilcoxon p vs DuSSS | steps | train s / run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for table in tables:
        for r in table["rows"]:
            m, f = r["method"], r["labeled"]
            paper = PAPER.get((m, f))
            pl = r["pseudo_label_dice"]
            pseudo = " / ".join(f"{100 * pl[k]:.1f}" if k in pl else "-"
                                for k in ("teacher_dice", "text_dice", "merged_dice")) if pl else "-"
            p = r.get("wilcoxon_p_vs_dusss")
            lines.append(f"| {NAMES.get(m, m)} | {round(100 * f)} % | {_pct(r['dice'], r['dice_std'])} | "
                         f"{_pct(r['iou'], r['iou_std'])} | {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '-'} | "
                         f"{r['seeds']} | {_pct(r['best_val'])} / {_pct(r['final_val'])} | {pseudo} | "
                         f"{'-' if p is None else f'{p:.3g}'} | {r['steps']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke check: seed 0, 2 epochs, 1 VLM epoch")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ap.add_argument("--methods", default="", help="comma list (default: every registered method)")
    ap.add_argument("--seeds", default="", help="comma list (default 0,1,2; --quick 0)")
    ap.add_argument("--labeled", default="", help="comma list of the semi-supervised grid's label fractions "
                                                   "(default 0.5,0.25)")
    ap.add_argument("--ablation", action="store_true", help="also run the Table 2 switches at 50 %% labels")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per run (no early stop by default)")
    ap.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (val Dice)")
    ap.add_argument("--width", type=int, default=None, help="U-Net base width (paper 64)")
    ap.add_argument("--image-size", type=int, default=None, help="side in px (default 128; the paper: 224)")
    ap.add_argument("--lr", type=float, default=None, help="Step-2 AdamW lr (default 1e-3)")
    ap.add_argument("--src", default=str(SRC_DEFAULT), help="the LViT-layout MoNuSeg folder")
    ap.add_argument("--results", default=None, help="results JSON (default benchmarks/results/monuseg_compare.json; "
                                                      "--quick: monuseg_quick.json in its runs folder)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tabulate the finished grid")
    ap.add_argument("--no-table", action="store_true", help="train only (for seeds run in parallel processes; "
                                                             "tabulate with --report-only after)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a Step-2 config key for every cell of a variant (needs --variant; repeatable)")
    ap.add_argument("--variant", default="", help="name of a variant grid: its cells go to GRID_VARIANT/ (with --set)")
    args = ap.parse_args(argv)
    if bool(args.set) != bool(args.variant):
        ap.error("--set and --variant go together (a variant's cells must not mix with the main grid's)")

    import torch

    from dusss import __version__ as dusss_version
    from dusss.engine.compare import run_compare, write_table
    from dusss.methods.segmentation import SEG_METHODS

    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.epochs is not None:
        size = replace(size, train_epochs=args.epochs, patience=min(size.patience, args.epochs))
    for key, value in (("patience", args.patience), ("image_size", args.image_size), ("unet_width", args.width),
                       ("lr", args.lr)):
        if value is not None:
            size = replace(size, **{key: value})
    seeds = [int(x) for x in args.seeds.split(",") if x] or ([0] if args.quick else [0, 1, 2])
    methods = [m for m in args.methods.split(",") if m] or SEG_METHODS.names()
    root = RUNS / ("quick" if args.quick else "full") / size.tag
    results = Path(args.results) if args.results else (
        root / "monuseg_quick.json" if args.quick
        else RESULTS.with_name(f"{RESULTS.stem}_{args.variant}.json") if args.variant else RESULTS)
    train, vlm = train_overrides(size, args.device, args.threads), pretrain_overrides(size, args.device, args.threads)
    # the grids: supervised and the text-equipped baselines on all 24 labeled images (the paper runs CLIP and
    # LViT fully supervised); every other method at 50 % and 25 %
    full_methods = [m for m in FULL_METHODS if m in methods]
    grids = [("full", full_methods, [1.0], {}, {})] if full_methods else []
    semi_fractions = [float(x) for x in args.labeled.split(",") if x] or list(SEMI_FRACTIONS)
    semi_methods = [m for m in methods if m not in FULL_ONLY]
    if semi_methods:
        grids.append(("semi", semi_methods, semi_fractions, {}, {}))
    ablation_names = {f"ablation_sss{int(s)}_dcl{int(d)}_tg{t:g}": n for n, s, d, t in ABLATION}
    if args.ablation:
        for slug, (_, sss, dcl, tg) in zip(ablation_names, ABLATION, strict=True):
            # the full variant re-trains `semi`'s dusss 50 % cells in its own grid
            grids.append((slug, ["dusss"], [0.5], {"semi.tg_weight": tg}, {"objective.sss": sss, "objective.dcl": dcl}))

    if args.variant:  # the same grids under their own folders, with the --set keys on every cell
        from dusss.config import parse_overrides

        sets = parse_overrides(args.set)
        grids = [(f"{name}_{args.variant}", gm, fr, {**extra, **sets}, ev) for name, gm, fr, extra, ev in grids]
    t_all = time.time()
    manifest = prepare_data(Path(args.src), size.image_size)
    tables: dict[str, dict[str, Any]] = {}
    for name, grid_methods, fractions, extra_train, extra_vlm in grids:
        out = root / name
        if args.report_only:
            tables[name] = write_table(out, grid_methods, fractions, seeds)
            continue
        log(f"grid {name}: {', '.join(grid_methods)} x {fractions} x seeds {seeds} -> {out}")
        table = run_compare(manifest, grid_methods, fractions, seeds, out, overrides={**train, **extra_train},
                            pretrain_overrides={**vlm, **extra_vlm}, progress=False)
        tables[name] = table
    if args.no_table:
        log(f"trained in {time.time() - t_all:.0f} s; tabulate with --report-only")
        return 0
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out_json = {
        "benchmark": "MoNuSeg (LViT release: 24 train / 6 val / 14 test, per-image texts), DuSSS paper Table 1",
        "command": "python benchmarks/monuseg.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "dusss": dusss_version,
        "size": {**size.__dict__, "tag": size.tag}, "seeds": seeds,
        "protocol": {"image_size": size.image_size,
                     "resize": "bilinear image; mask bilinear then >= 0.5 (LViT uses > 0, which dilates nuclei at "
                               "low resolution)",
                     "model_selection": "best val Dice (6 val images); test evaluated once per run",
                     "vlm_pretraining": "one per seed and objective, on the 24 training images + texts, no masks",
                     "metric": "per-image Dice / IoU at 0.5, mean over the 14 test images"},
        "paper": {f"{m}_{round(f * 100)}": {"dice": d, "miou": i} for (m, f), (d, i) in PAPER.items()},
        "grids": tables, "ablation_variants": {k: v for k, v in ablation_names.items() if k in tables},
        "total_wall_seconds_this_call": time.time() - t_all,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out_json, indent=2) + "\n")
    print(paper_table([t for n, t in tables.items() if n not in ablation_names]))
    for slug, variant in ablation_names.items():
        if slug in tables:
            r = tables[slug]["rows"][0]
            print(f"ablation {variant}: test Dice {_pct(r['dice'], r['dice_std'])}, "
                  f"pseudo-label Dice {r['pseudo_label_dice']}")
    log(f"done in {time.time() - t_all:.0f} s; results -> {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
