"""The embedded phantom dataset: procedural chest-X-ray-like images, lesion masks and QaTa-style reports.

Each image has a dark pair of lung fields inside a brighter body, a bright mediastinum (spine and heart,
the heart bulging towards the patient's left), rib-like arcs and smooth noise texture. 0-3 lesions
(P = 0.1/0.35/0.35/0.2) are brighter irregular blobs in a random lung (side) and third of the image
height (zone); about 30 % are faint (contrast close to the texture), so that the image alone is ambiguous
and the report really helps. The report is generated from the mask by `caption_mask(style="qata")`,
whose radiological convention puts the patient's left lung on the image's right.

Phantom i depends only on (seed, i), so a larger `n` extends a smaller set; the split (60/20/20,
at least one image per split) is drawn from its own stream. Same arguments -> identical bytes.
Writing into a folder that already holds manifest.csv or phantom_* files needs `overwrite` (then they are
replaced and nothing else is deleted).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from dusss.data.caption import ZONES, caption_mask, check_caption_style, zone_of_rows
from dusss.data.manifest import write_manifest
from dusss.errors import ConfigError, DataError
from dusss.outputs import check_outputs

LESION_COUNT_P = (0.1, 0.35, 0.35, 0.2)
FAINT_P = 0.3
# (centre u, centre v, radius u, radius v) in image fractions; image-left lung = patient's right lung
_LUNGS = {"right": (0.31, 0.50, 0.155, 0.33), "left": (0.69, 0.51, 0.145, 0.31)}
_HEART = (0.56, 0.69, 0.15, 0.13)  # the heart ellipse; it is cut out of the lung fields


def _interp_matrix(g: int, size: int) -> np.ndarray:
    x = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    w = x - lo
    m = np.zeros((size, g))
    m[np.arange(size), lo] += 1 - w
    m[np.arange(size), hi] += w
    return m


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    m = _interp_matrix(grid, size)
    return m @ rng.standard_normal((grid, grid)) @ m.T


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, sharp: float):
    r = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) * sharp, -50, 50)))


def _lesion(u, v, cu, cv, r0, rng):
    du, dv = u - cu, v - cv
    d = np.sqrt(du**2 + dv**2)
    theta = np.arctan2(dv, du)
    radius = np.full_like(d, r0)
    for k in (2, 3, 4):
        radius += r0 * rng.uniform(0.0, 0.13) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rel = d / radius
    profile = 1.0 / (1.0 + np.exp(np.clip((rel - 0.85) * 10.0, -50, 50)))
    return rel < 1.0, profile


def _lung_fields(u: np.ndarray, v: np.ndarray, jit: np.ndarray, scale: float, sharp: float):
    """(lung ellipses per side, heart field, soft lung field per side with the heart cut out)."""
    lungs = {}
    for side, (cu, cv, ru, rv) in _LUNGS.items():
        lungs[side] = (cu + jit[1], cv + jit[2], ru * scale, rv * scale)
    heart = _ellipse(u, v, _HEART[0] + jit[3], *_HEART[1:], sharp)
    fields = {side: _ellipse(u, v, *p, sharp) * (1 - heart) for side, p in lungs.items()}
    return lungs, heart, fields


def lung_zone_masks(size: int) -> dict[tuple[str, str], np.ndarray]:
    """The report's zones of the nominal phantom lungs at `size` px: `{(zone, side): bool [S,S]}`.

    Lungs are the phantom lung fields without per-image jitter (0.95-1.05 scale, ±1.5 % shift), heart cut out,
    in the lesions' `lung > 0.5` sense; sides follow `_LUNGS` (the patient's side, radiological convention:
    "right" is the image-left lung); zones are `caption.zone_of_rows` (thirds of the image height), so
    `caption_mask` of a zone's mask names that zone.
    """
    c = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(c, c)
    _, _, fields = _lung_fields(u, v, np.zeros(4), 1.0, 0.25 * size / 4)
    rows = zone_of_rows(np.arange(size), size)[:, None]
    return {(zone, side): (fields[side] > 0.5) & (rows == z)
            for z, zone in enumerate(ZONES) for side in _LUNGS}


def _phantom(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: (uint8 image [S,S], uint8 mask [S,S] in {0,1})."""
    rng = np.random.default_rng([seed, 0, index])
    c = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(c, c)
    sharp = 0.25 * size / 4
    jit = rng.uniform(-0.015, 0.015, size=4)
    scale = rng.uniform(0.95, 1.05)
    body = _ellipse(u, v, 0.5 + jit[0], 0.58, 0.47, 0.55, sharp)
    lungs, heart, fields = _lung_fields(u, v, jit, scale, sharp)
    lung = np.maximum(*fields.values())
    tissue = rng.uniform(0.45, 0.55)
    img = 0.04 + body * (tissue - 0.04)
    img += 0.15 * body * np.exp(-(((u - 0.5 - jit[0]) / 0.045) ** 2))  # spine
    img = img * (1 - heart * body) + heart * body * rng.uniform(0.6, 0.68)
    img = img * (1 - lung) + lung * rng.uniform(0.14, 0.2)
    for i in range(9):  # rib-like arcs over each lung, highest at mid-lung, sloping down at both ends
        centre = 0.17 + i * 0.07 + 3.0 * (np.abs(u - 0.5) - 0.19) ** 2 + 0.04 * (np.abs(u - 0.5) - 0.19)
        img += 0.07 * body * np.exp(-(((v - centre) / 0.012) ** 2)) * (0.3 + 0.7 * lung)
    texture = 0.03 * _smooth_noise(rng, size, 8) + 0.02 * _smooth_noise(rng, size, 24)
    img += texture * body
    mask = np.zeros((size, size), dtype=bool)
    placed: list[tuple[float, float, float]] = []
    n_lesions = int(rng.choice(len(LESION_COUNT_P), p=LESION_COUNT_P))
    for _ in range(n_lesions):
        side = "left" if rng.random() < 0.5 else "right"
        zone = int(rng.integers(3))
        faint = rng.random() < FAINT_P
        contrast = rng.uniform(0.07, 0.12) if faint else rng.uniform(0.18, 0.32)
        r0 = rng.uniform(0.035, 0.07)
        cu, cv, ru, rv = lungs[side]
        for _attempt in range(20):
            lo = max(zone / 3, cv - rv) + 0.5 * r0
            hi = min((zone + 1) / 3, cv + rv) - 0.5 * r0
            pv = rng.uniform(lo, max(lo, hi))
            half = ru * np.sqrt(max(0.0, 1 - ((pv - cv) / rv) ** 2))
            pu = cu + rng.uniform(-0.6, 0.6) * half
            if any(np.hypot(pu - qu, pv - qv) < r0 + qr + 0.03 for qu, qv, qr in placed):
                continue
            shape, profile = _lesion(u, v, pu, pv, r0, rng)
            shape &= lung > 0.5
            if shape.sum() < 0.3 * np.pi * (r0 * size) ** 2:
                continue
            grain = 0.75 + 0.5 * (0.5 + 0.5 * np.tanh(_smooth_noise(rng, size, 16)))
            img += contrast * profile * (lung > 0.5) * grain
            mask |= shape
            placed.append((pu, pv, r0))
            break
    img += rng.normal(0.0, 0.015, size=img.shape)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    return np.round(img * 255).astype(np.uint8), mask.astype(np.uint8)


MAX_PHANTOMS = 1_000_000  # `--n` bound: a typo (an extra 0 or two) fails at once instead of filling the disk


def _splits(n: int, seed: int) -> list[str]:
    n_val = n_test = max(1, math.floor(0.2 * n + 0.5))
    order = np.random.default_rng([seed, 1]).permutation(n)
    split = ["train"] * n
    for pos, i in enumerate(order.tolist()):
        if pos < n_val:
            split[i] = "val"
        elif pos < n_val + n_test:
            split[i] = "test"
    return split


def generate_phantoms(out: str | Path, n: int, size: int = 128, seed: int = 0, caption_style: str = "qata",
                      overwrite: bool = False) -> Path:
    """Write OUT/images/*.png, OUT/masks/*.png and OUT/manifest.csv; return the manifest path.

    `caption_style` picks the report vocabulary (one of `dusss.data.caption.CAPTION_STYLES`); images and
    masks do not depend on it. DusssError before anything is written if one of these files exists and
    `overwrite` is not set.
    """
    check_caption_style(caption_style, "--caption-style")
    if not isinstance(n, int) or not 3 <= n <= MAX_PHANTOMS:
        raise ConfigError(f"--n must be an integer in [3, {MAX_PHANTOMS}] (one image per split at least), got {n!r}")
    if not isinstance(size, int) or not 32 <= size <= 4096:
        raise ConfigError(f"--size must be an integer in [32, 4096], got {size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DataError(root, "exists and is not a folder")
    names = [f"phantom_{i:04d}.png" for i in range(n)]
    check_outputs([root / "manifest.csv", *(root / d / f for d in ("images", "masks") for f in names)],
                  overwrite=overwrite)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    splits = _splits(n, seed)
    rows = []
    for i in range(n):
        image, mask = _phantom(seed, i, size)
        name = f"phantom_{i:04d}"
        Image.fromarray(image).save(root / "images" / f"{name}.png", format="PNG")
        Image.fromarray(mask * 255).save(root / "masks" / f"{name}.png", format="PNG")
        rows.append(
            {
                "image": f"images/{name}.png",
                "mask": f"masks/{name}.png",
                "text": caption_mask(mask, style=caption_style),
                "split": splits[i],
                "case_id": name,
            }
        )
    return write_manifest(root / "manifest.csv", rows)
