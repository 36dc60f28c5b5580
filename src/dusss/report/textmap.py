"""Text heat-maps (paper Fig. 5): the frozen VLM's text-guided mask for any prompt on one image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dusss.data.readers import read_image
from dusss.engine.precision import resolve_device
from dusss.runfiles import TEXT_MASK, run_file


def load_text_mask_generator(vlm_path: str | Path, model_run: str | Path | None, device: torch.device):
    """A TextMaskGenerator over the VLM; with a `dusss train` run, its trained grounding decoder is loaded."""
    from dusss.checkpoint import load_checkpoint
    from dusss.config import from_dict
    from dusss.methods.segmentation import SegMethodConfig
    from dusss.models.grounding import TextMaskConfig, TextMaskGenerator
    from dusss.models.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.from_checkpoint(vlm_path).to(device)
    tensors, cfg = None, SegMethodConfig().text_mask
    if model_run is not None:
        path = Path(model_run)
        path = run_file(path, TEXT_MASK)
        tensors, meta = load_checkpoint(path, "text_mask")
        saved = (meta.get("text_mask") or {}).get("text_mask")  # the run's semi config holds f_g's architecture
        if isinstance(saved, dict):
            # runs saved before `text_condition` existed had the unconditioned generator
            cfg = from_dict(TextMaskConfig, {"text_condition": "none", **saved})
    gen = TextMaskGenerator(vlm, cfg).to(device)
    if tensors is not None:
        gen.load_trainable_state_dict(tensors)
    return gen.eval()


@torch.no_grad()
def text_probability_maps(generator, image: np.ndarray, prompts: list[str], image_size: int) -> np.ndarray:
    """σ(text logits) [P,H,W] at the image's resolution, one map per prompt."""
    from dusss.data.transforms import logits_at, model_input

    device = next(generator.parameters()).device
    logits = generator.text_logits(model_input(image, image_size).to(device), prompts)  # [P,1,S,S]
    return torch.sigmoid(logits_at(logits, image.shape[:2]))[:, 0].cpu().numpy()


def textmap_figure(vlm_path: str | Path, image_path: str | Path, prompts: list[str], out: str | Path,
                   model_run: str | Path | None = None, device: str = "auto", overwrite: bool = False) -> Path:
    """Write a PNG with the image and one heat-map panel per prompt.

    DusssError before any work if `out` is one of the inputs, or exists and `overwrite` is not set.
    """
    from dusss.checkpoint import load_checkpoint, sidecar_path
    from dusss.figures import heatmap, save_png
    from dusss.outputs import check_outputs

    mask_file = None if model_run is None else run_file(model_run, TEXT_MASK)
    inputs = [("image", image_path), ("--vlm", vlm_path), ("--vlm's sidecar", sidecar_path(vlm_path)),
              ("--model", mask_file), ("--model's sidecar", None if mask_file is None else sidecar_path(mask_file))]
    check_outputs([out], inputs=inputs, overwrite=overwrite)
    dev = resolve_device(device)
    _, meta = load_checkpoint(vlm_path, "vlm")
    image = read_image(image_path)
    gen = load_text_mask_generator(vlm_path, model_run, dev)
    maps = text_probability_maps(gen, image, prompts, int(meta.get("image_size", 128)))
    panels = [np.clip(image * 255, 0, 255).astype(np.uint8)] + [heatmap(image, m) for m in maps]
    save_png(_titled_row(panels, ["image"] + prompts), out)
    return Path(out)


def _titled_row(panels: list[np.ndarray], titles: list[str]) -> np.ndarray:
    """Panels side by side with titles (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4), squeeze=False)
    for ax, panel, title in zip(axes[0], panels, titles):
        ax.imshow(panel)
        ax.set_title("\n".join(_wrap(title, 28)), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur] if cur else lines
