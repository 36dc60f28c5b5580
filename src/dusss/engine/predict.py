"""Inference with the student U-Net alone: image in, mask out (no text, no VLM, no teacher)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dusss.data.readers import read_image
from dusss.engine.precision import resolve_device
from dusss.engine.train import load_segmentation_model
from dusss.report.figures import contour_overlay, save_png


def predict_probability(model: torch.nn.Module, image: np.ndarray, image_size: int, device: torch.device) -> np.ndarray:
    """Foreground probability [H,W] at the image's own resolution (model runs at image_size²)."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
    h, w = image.shape[:2]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = model(x.to(device)).float()
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


def predict_files(model_path: str | Path, images: list[str | Path], out: str | Path, device: str = "auto",
                  overlays: bool = True) -> list[Path]:
    """Write OUT/<stem>_mask.png (0/255) and OUT/<stem>_overlay.png for each image; returns the mask paths."""
    dev = resolve_device(device)
    model, meta = load_segmentation_model(model_path, dev)
    size, threshold = int(meta["image_size"]), float(meta.get("threshold", 0.5))
    images = [Path(p) for p in images]
    decoded = [(p, read_image(p)) for p in images]  # fail on a bad file before writing anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image in decoded:
        prob = predict_probability(model, image, size, dev)
        mask = (prob >= threshold).astype(np.uint8)
        mask_path = out / f"{path.stem}_mask.png"
        Image.fromarray(mask * 255, mode="L").save(mask_path)  # single-channel 0/255
        if overlays:
            save_png(contour_overlay(image, None, mask), out / f"{path.stem}_overlay.png")
        written.append(mask_path)
    return written
