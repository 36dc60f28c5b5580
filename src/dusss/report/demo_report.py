"""The demo's HTML report: results table, overlays, text heat-maps (paper Fig. 5) and training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dusss.data.manifest import read_manifest
from dusss.data.readers import read_image, read_mask
from dusss.engine.logging import read_metrics
from dusss.runfiles import RunFiles


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST))


def _metric_curves(runs: dict[str, Path], keys: list[tuple[str, str]]) -> np.ndarray:
    """One panel per (key, title): that metric per epoch for every run (matplotlib, Agg). Keys ending in
    "loss" get a log axis, so methods whose totals differ in scale stay readable side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for name, run in runs.items():
            path = RunFiles(run).metrics
            if not path.is_file():
                continue
            rows = read_metrics(path)
            pts = [(r["epoch"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if key.endswith("loss") and ax.lines:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def _pseudo_curves(run: Path) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(RunFiles(run).metrics)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for name in ("teacher", "text", "merged"):
        pts = [(r["epoch"], r[f"pseudo/{name}_dice"]) for r in rows if f"pseudo/{name}_dice" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    ax.set_title("pseudo-label Dice on unlabeled images (dusss)", fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def heatmap_prompts(report: str) -> list[str]:
    """The image's own report, a reworded version, and contrasting prompts (paper Fig. 5)."""
    return [
        report,
        report.replace("infected areas", "lesions").replace("infected area", "lesion").replace("infection", "opacity"),
        "Lower left lung.",
        "Infection in the left lower zone.",
        "Upper right lung.",
        "No pulmonary infection.",
    ]


_METHOD_WORDS = ("supervised: labeled images only; mt: SSL4MIS Mean Teacher; unimatch: weak-to-strong "
                 "consistency; dusss: Mean Teacher on a strong view whose pseudo-labels merge the text-guided "
                 "mask of the frozen VLM")


def write_demo_report(out: Path, summary: dict[str, Any], manifest: Path, n_examples: int = 4) -> Path:
    """Write OUT/report.html from the demo's runs."""
    import torch

    from dusss.engine.predict import predict_probability
    from dusss.engine.train import load_segmentation_model
    from dusss.figures import contour_overlay, heatmap
    from dusss.report.html import ImageGridSection, ImageSection, TableSection, TextSection, build_report
    from dusss.report.textmap import load_text_mask_generator, text_probability_maps

    out = Path(out)
    methods = list(summary["methods"])
    size = int(summary["size"]["image_size"])
    nan = float("nan")
    rows = [[m, r["dice"], r["miou"], r.get("hd95", nan), r.get("best_val", nan), r.get("final_val", nan),
             r.get("drop", nan), r.get("steps", 0)] for m, r in summary["methods"].items()]
    sections: list[Any] = [
        TextSection("What ran", (
            f"Phantom chest X-ray set ({summary['size']['n_images']} images, {size} px), 25 % of the training images "
            f"labeled. The VLM was pre-trained with DuSSS (SSS + dual contrastive learning) on image–report pairs; "
            f"then {', '.join(f'`{m}`' for m in methods)} ({_METHOD_WORDS}) trained the same U-Net for the same "
            f"number of optimizer steps, each from its published preset. Test-split figures of the best-val "
            f"checkpoint; protocol: per-image mean at threshold 0.5. Stability: the best and the final val Dice "
            f"of each run and the drop between them. Total time {summary['seconds']:.0f} s on this machine.")),
        TableSection("Test results", ["method", "Dice", "mIoU", "HD95 (px)", "best val Dice", "final val Dice",
                                      "drop from best", "steps"], rows,
                     best={"Dice": "max", "mIoU": "max", "HD95 (px)": "min", "drop from best": "min"}),
    ]
    pl = summary.get("pseudo_label_dice") or {}
    if pl:
        sections.append(TableSection(
            "Pseudo-label Dice on the unlabeled training images (dusss, best epoch)",
            ["teacher", "text mask", "merged"], [[pl.get("teacher"), pl.get("text"), pl.get("merged")]],
            best={}))

    device = torch.device("cpu")
    test = [r for r in read_manifest(manifest) if r.split == "test" and r.mask is not None]
    test = sorted(test, key=lambda r: -int(read_mask(r.mask).sum()))[:n_examples] if test else []
    models = {m: load_segmentation_model(out / m, device)[0] for m in methods}
    grid_rows = []
    for rec in test:
        image = read_image(rec.image)
        gt = read_mask(rec.mask)
        cells = [_resize(image, 192), _resize(contour_overlay(image, gt, None), 192)]
        for m in methods:
            pred = (predict_probability(models[m], image, size, device) >= 0.5).astype(np.uint8)
            cells.append(_resize(contour_overlay(image, gt, pred), 192))
        grid_rows.append((rec.text, cells))
    if grid_rows:
        sections.append(ImageGridSection(
            "Test images: ground truth (green) and each method's prediction (red)",
            ["image", "ground truth"] + methods, grid_rows, captions=None))

    if test and RunFiles(out / "dusss").text_mask.is_file():
        rec = test[0]
        image = read_image(rec.image)
        gen = load_text_mask_generator(RunFiles(out / "vlm").vlm, out / "dusss", device)
        prompts = heatmap_prompts(rec.text)
        maps = text_probability_maps(gen, image, prompts, size)
        sections.append(ImageGridSection(
            "Text heat-maps on one test image (frozen VLM + trained grounding decoder), one prompt per panel",
            ["image"] + [f"prompt {i + 1}" for i in range(len(prompts))],
            [("σ(text logit)", [_resize(image, 160)] + [_resize(heatmap(image, m), 160) for m in maps])],
            captions=[f"prompt {i + 1}: {p}" for i, p in enumerate(prompts)]))

    runs = {m: out / m for m in methods}
    sections.append(ImageSection("Training curves", _metric_curves(
        runs, [("train/sup", "supervised loss L_sup"), ("train/loss", "total training loss"),
               ("val/dice", "validation Dice")]),
        caption="per epoch, each method; L_sup is the same term for every method, the totals add each method's "
                "unlabeled and text terms"))
    if RunFiles(out / "dusss").metrics.is_file():
        sections.append(ImageSection("Pseudo-labels during training", _pseudo_curves(out / "dusss"),
                                     caption="Dice of the teacher's, the text mask's and the merged pseudo-labels "
                                             "against the hidden masks of the unlabeled images"))
    if RunFiles(out / "vlm").curves.is_file():
        from PIL import Image

        sections.append(ImageSection("VLM pre-training", np.asarray(Image.open(RunFiles(out / "vlm").curves).convert("RGB")),
                                     caption="loss terms and validation retrieval"))
    return build_report(out / "report.html", "dusss demo report", sections)
