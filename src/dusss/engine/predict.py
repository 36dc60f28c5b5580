"""Inference with the trained network: image in, mask out. The student U-Net of every semi-supervised method
needs nothing else (no text, no VLM, no teacher); the text-conditioned baselines (`clip`, `lvit`) also take
each image's report (`texts`: one for all images, or one per image).

Outputs are OUT/<name>_mask.png (OUT/<name>_mask.nii.gz for a NIfTI image, in its world space) and
OUT/<name>_overlay.png, where <name> is the image's name without its extension (`scan.nii.gz` -> `scan`); images that
share a stem are told apart by their parent folders (`a/scan.png`, `b/scan.png` -> `a__scan`, `b__scan`,
see `dusss.outputs.distinct_stems`), and the same file given twice is predicted once. An output that is one
of the inputs is refused, and existing outputs are replaced only with `overwrite`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dusss.checkpoint import sidecar_path
from dusss.data.readers import is_nifti, nifti_slice_affine, read_image
from dusss.data.transforms import logits_at, model_input
from dusss.engine.precision import resolve_device
from dusss.engine.train import load_segmentation_model
from dusss.errors import ConfigError
from dusss.figures import contour_overlay, save_png
from dusss.models.networks import needs_text, segment
from dusss.outputs import check_outputs, distinct_stems, unique_files
from dusss.runfiles import run_file


def predict_probability(model: torch.nn.Module, image: np.ndarray, image_size: int, device: torch.device,
                        text: str | None = None) -> np.ndarray:
    """Foreground probability [H,W] at the image's own resolution (the model runs at image_size², on the image
    resized as in training); `text` is the image's report, for a text-conditioned network."""
    with torch.no_grad():
        logits = segment(model, model_input(image, image_size).to(device), None if text is None else [text])
    return torch.sigmoid(logits_at(logits, image.shape[:2]))[0, 0].cpu().numpy()


def output_names(images: list[str | Path], out: str | Path, overlays: bool = True) -> list[tuple[Path, Path | None]]:
    """(mask path, overlay path or None) per image, never the same for two images (module docstring); the mask
    of a NIfTI image is a NIfTI file (`NAME_mask.nii.gz`), of any other a PNG."""
    out = Path(out)
    return [(out / f"{n}_mask{'.nii.gz' if is_nifti(p) else '.png'}", out / f"{n}_overlay.png" if overlays else None)
            for n, p in zip(distinct_stems([Path(p) for p in images]), images)]


def _write_mask(mask: np.ndarray, path: Path, source: str | Path) -> None:
    """A {0,1} mask as PNG (0/255), or for a NIfTI source as NIfTI (uint8 0/1) in the source's world space:
    the slice's affine (`nifti_slice_affine`), one slice deep for a volume."""
    if path.name.endswith(".nii.gz"):
        import nibabel

        affine, volume = nifti_slice_affine(source)
        data = mask[:, :, None] if volume else mask
        nibabel.save(nibabel.Nifti1Image(data.astype(np.uint8), affine), str(path))
        return
    Image.fromarray(mask * 255, mode="L").save(path)  # single-channel 0/255


def _texts_per_image(texts: list[str] | None, given: list[Path], unique: list[Path]) -> list[str] | None:
    """One report per unique image (`unique`: `given` without repeats, in order) from `texts`: one report for
    every image, or one per given image (a repeated image keeps its first report); None without texts."""
    if not texts:
        return None
    if len(texts) == 1:
        return list(texts) * len(unique)
    if len(texts) != len(given):
        raise ConfigError(f"--text: {len(texts)} reports for {len(given)} image(s); give one for all or one per image")
    out: list[str] = []
    for path, text in zip(given, texts):  # `unique` is a subsequence of `given`: walk both
        if len(out) < len(unique) and path == unique[len(out)]:
            out.append(text)
    return out


def predict_files(model_path: str | Path, images: list[str | Path], out: str | Path, device: str = "auto",
                  overlays: bool = True, overwrite: bool = False, texts: list[str] | None = None) -> list[Path]:
    """Write OUT/<name>_mask.png (0/255) and OUT/<name>_overlay.png for each image; returns the mask paths.

    <name> is the stem, or parent folders + stem where stems collide (module docstring). `texts`: the reports
    a text-conditioned network needs (one for all images or one per image; ignored by a U-Net student).
    DusssError before anything is written for an output that is an input, that exists without `overwrite`,
    or for a text-conditioned network given no reports.
    """
    given = [Path(p) for p in images]
    images = unique_files(images)
    reports = _texts_per_image(texts, given, [Path(p) for p in images])
    names = output_names(images, out, overlays)
    source = run_file(model_path)
    inputs = [("--model", source), ("--model's sidecar", sidecar_path(source)), *(("image", p) for p in images)]
    check_outputs([p for pair in names for p in pair if p is not None], inputs=inputs, overwrite=overwrite)
    dev = resolve_device(device)
    model, meta = load_segmentation_model(model_path, dev)
    if needs_text(model) and reports is None:
        raise ConfigError(f"{source}: method {meta.get('method')!r} ({meta.get('network')} network) needs each "
                          "image's report at inference: pass --text")
    size, threshold = int(meta["image_size"]), float(meta.get("threshold", 0.5))
    decoded = [read_image(p) for p in images]  # fail on a bad file before writing anything
    results = []  # every mask and overlay is computed before the first file is written
    for i, (image, (_, overlay_path)) in enumerate(zip(decoded, names)):
        text = reports[i] if reports is not None and needs_text(model) else None
        mask = (predict_probability(model, image, size, dev, text) >= threshold).astype(np.uint8)
        results.append((mask, contour_overlay(image, None, mask) if overlay_path is not None else None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (mask, overlay_image), (mask_path, overlay_path), source in zip(results, names, images):
        _write_mask(mask, mask_path, source)
        if overlay_path is not None and overlay_image is not None:
            save_png(overlay_image, overlay_path)
        written.append(mask_path)
    return written
