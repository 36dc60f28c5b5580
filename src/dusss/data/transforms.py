"""Seeded paired augmentations in numpy (no torchvision, no scipy) and resizing.

Images are float32 [H,W,3] in [0,1], masks uint8 [H,W] in {0,1}. Geometric transforms move image and
mask together (image bilinear, mask nearest, zero fill outside); intensity transforms touch the image only.
Every random function takes a `numpy.random.Generator`, so a seed fixes the result.

Policies of `random_geometric`:
- ``"text_safe"`` (default): horizontal flip (p=0.5), then a rotation in [-max_rotation, max_rotation]
  degrees (p=0.5) and an optional zoom. A horizontal flip is reported (`GeoParams.hflip`), so the caller
  swaps "left"/"right" in the text (`text_aug.swap_laterality`); no rot90 or vertical flip, whose
  effect on "upper"/"lower"/"left"/"right" a text cannot follow.
- ``"lvit"``: the authors' RandomGenerator: with p=0.5 a rot90 (k in 0..3) then a flip on a random axis;
  otherwise with p=0.5 a rotation in [-max_rotation, max_rotation]; otherwise nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

POLICIES = ("text_safe", "lvit")


@dataclass(frozen=True)
class GeoParams:
    """What a random geometric transform did (rot90 turns k, flip axis or None, angle, zoom)."""

    k: int = 0
    flip: int | None = None
    angle: float = 0.0
    scale: float = 1.0

    @property
    def hflip(self) -> bool:
        """True when the net effect mirrors left and right while keeping top and bottom."""
        return (self.k == 0 and self.flip == 1) or (self.k == 2 and self.flip == 0)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of [H,W,C] float32 to `size` (S or (H,W))."""
    h, w = _size2(size)
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image, dtype=np.float32)
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32)).resize(
                (w, h), Image.Resampling.BILINEAR
            )
        )
        for c in range(image.shape[2])
    ]
    return np.clip(np.stack(chans, axis=2), 0.0, 1.0).astype(np.float32)


def model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """[H,W,3] float image -> [1,3,S,S] float32 tensor, resized exactly as training resizes (`resize_image`:
    antialiased bilinear), so that inference sees what the network was trained on."""
    import torch

    resized = resize_image(image, size)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()[None]


def logits_at(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Logits [B,C,S,S] brought back to an image's [H,W] (bilinear on logits, then threshold or sigmoid)."""
    import torch.nn.functional as F

    if tuple(logits.shape[-2:]) == tuple(shape):
        return logits.float()
    return F.interpolate(logits.float(), size=tuple(shape), mode="bilinear", align_corners=False)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a {0,1} uint8 [H,W] mask to `size` (S or (H,W))."""
    h, w = _size2(size)
    if mask.shape == (h, w):
        return np.ascontiguousarray(mask, dtype=np.uint8)
    out = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(out, dtype=np.uint8)


def rot90(image: np.ndarray, mask: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate by k x 90 degrees counter-clockwise (np.rot90)."""
    img = np.ascontiguousarray(np.rot90(image, k, axes=(0, 1)))
    return img, None if mask is None else np.ascontiguousarray(np.rot90(mask, k, axes=(0, 1)))


def flip(image: np.ndarray, mask: np.ndarray | None, axis: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip along axis 0 (upside down) or 1 (left-right)."""
    img = np.ascontiguousarray(np.flip(image, axis))
    return img, None if mask is None else np.ascontiguousarray(np.flip(mask, axis))


def affine(
    image: np.ndarray, mask: np.ndarray | None, angle: float = 0.0, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate counter-clockwise by `angle` degrees and zoom by `scale` about the centre, same size."""
    h, w = image.shape[:2]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    y, x = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    t = math.radians(angle)
    ys = (math.cos(t) * y + math.sin(t) * x) / scale + cy
    xs = (-math.sin(t) * y + math.cos(t) * x) / scale + cx
    out_img = _bilinear(image, ys, xs)
    if mask is None:
        return out_img, None
    yi, xi = np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    out_mask = np.zeros_like(mask)
    out_mask[inside] = mask[yi[inside], xi[inside]]
    return out_img, out_mask


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    out = np.zeros(ys.shape + image.shape[2:], dtype=np.float64)
    for dy, dx, wgt in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        vals = np.zeros_like(out)
        vals[ok] = image[yy[ok], xx[ok]]
        out += wgt * vals if image.ndim == 3 else wgt[..., 0] * vals
    return out.astype(np.float32)


def apply_geometric(
    image: np.ndarray, mask: np.ndarray | None, params: GeoParams
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply rot90, then flip, then rotation/zoom as recorded in `params`."""
    if params.k:
        image, mask = rot90(image, mask, params.k)
    if params.flip is not None:
        image, mask = flip(image, mask, params.flip)
    if params.angle or params.scale != 1.0:
        image, mask = affine(image, mask, params.angle, params.scale)
    return image, mask


def sample_geometric(
    rng: np.random.Generator,
    policy: str = "text_safe",
    max_rotation: float = 20.0,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> GeoParams:
    """Draw the parameters of one random geometric transform (see the module docstring)."""
    if policy == "lvit":
        if rng.random() < 0.5:
            return GeoParams(k=int(rng.integers(4)), flip=int(rng.integers(2)))
        if rng.random() < 0.5:
            return GeoParams(angle=float(rng.uniform(-max_rotation, max_rotation)))
        return GeoParams()
    if policy != "text_safe":
        raise ValueError(f"unknown augmentation policy {policy!r} (use one of {POLICIES})")
    hflip = rng.random() < 0.5
    angle = float(rng.uniform(-max_rotation, max_rotation)) if rng.random() < 0.5 else 0.0
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    return GeoParams(flip=1 if hflip else None, angle=angle, scale=scale)


def random_geometric(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    policy: str = "text_safe",
    max_rotation: float = 20.0,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray | None, GeoParams]:
    """A random paired geometric transform; returns (image, mask, params)."""
    params = sample_geometric(rng, policy, max_rotation, scale_range)
    image, mask = apply_geometric(image, mask, params)
    return image, mask, params


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """Add `delta` to every pixel, clipped to [0,1]."""
    return np.clip(image + delta, 0.0, 1.0).astype(np.float32)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale deviations from the image mean by `factor`, clipped to [0,1]."""
    mean = float(image.mean())
    return np.clip((image - mean) * factor + mean, 0.0, 1.0).astype(np.float32)


def adjust_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """`image ** gamma` (gamma > 0)."""
    return np.power(np.clip(image, 0.0, 1.0), gamma).astype(np.float32)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add gaussian noise of std `sigma` (same on every channel of a pixel), clipped to [0,1]."""
    noise = rng.normal(0.0, sigma, size=image.shape[:2])
    noise = noise[..., None] if image.ndim == 3 else noise
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


def random_intensity(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Each with p=0.5: brightness +-0.1, contrast x[0.8,1.2], gamma in [0.8,1.25], noise std <= 0.03."""
    s = strength
    if rng.random() < 0.5:
        image = adjust_brightness(image, float(rng.uniform(-0.1, 0.1)) * s)
    if rng.random() < 0.5:
        image = adjust_contrast(image, 1.0 + float(rng.uniform(-0.2, 0.2)) * s)
    if rng.random() < 0.5:
        image = adjust_gamma(image, math.exp(float(rng.uniform(-1.0, 1.0)) * math.log(1.25) * s))
    if rng.random() < 0.5:
        image = add_noise(image, float(rng.uniform(0.0, 0.03)) * s, rng)
    return image.astype(np.float32)
