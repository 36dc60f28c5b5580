"""Image figures for reports, in numpy + Pillow: mask overlays, contours, heat-maps, grids, PNG output.

Images are `[H,W,3]` float in [0,1] (uint8 and `[H,W]` grey are accepted); masks are `[H,W]` with values
in {0,1} (bool, uint8 0/255 or float probabilities: > 0.5 counts as foreground for contours, overlays
blend by the clipped value). Every function returns a new `uint8 [H,W,3]` array.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[float, float, float] | str

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.4, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.55, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}


def _rgb(color: Color) -> np.ndarray:
    if isinstance(color, str):
        if color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; use one of {sorted(COLORS)} or an RGB tuple")
        return np.asarray(COLORS[color], dtype=np.float32)
    c = np.asarray(color, dtype=np.float32).reshape(3)
    return c / 255.0 if c.max() > 1.0 else c


def as_float_rgb(image: np.ndarray) -> np.ndarray:
    """`[H,W]`, `[H,W,1]`, `[H,W,3]` or `[H,W,4]`, uint8 or float → float32 `[H,W,3]` in [0,1]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3, 4):  # CHW tensor layout
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image [H,W], [H,W,3] or [H,W,4], got shape {a.shape}")
    a = a[..., :3] if a.shape[2] == 4 else np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    return np.clip(np.nan_to_num(a), 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Any accepted image → uint8 `[H,W,3]` (float values in [0,1] are scaled by 255 and rounded)."""
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        return a
    return np.round(as_float_rgb(a) * 255.0).astype(np.uint8)


def squeeze2d(a: np.ndarray) -> np.ndarray:
    """Drop singleton axes down to 2-D, a trailing (channel) one first: `[H,W,1]`, `[1,H,W]`, `[1,1,H,W]` →
    `[H,W]`. Unlike `np.squeeze` it keeps a side of 1 (a 1xW or 1x1 image stays 2-D)."""
    m = np.asarray(a)
    while m.ndim > 2 and (m.shape[-1] == 1 or m.shape[0] == 1):
        m = m[..., 0] if m.shape[-1] == 1 else m[0]
    return m


def _mask2d(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2 and m.size == shape[0] * shape[1]:  # [1,H,W], [H,W,1] ... of the image: no guessing
        m = m.reshape(shape)
    m = squeeze2d(m)
    if m.ndim != 2:
        raise ValueError(f"expected a mask [H,W], got shape {np.asarray(mask).shape}")
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 and m.max(initial=0) > 1 else m.astype(np.float32)
    if m.shape != shape:
        m = _resize_float(m, shape)
    return np.clip(np.nan_to_num(m), 0.0, 1.0)


def _resize_float(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(image: np.ndarray, mask: np.ndarray, color: Color = "red", alpha: float = 0.45) -> np.ndarray:
    """Blend `color` over `image` where `mask` is set: out = image·(1 − α·m) + color·α·m."""
    img = as_float_rgb(image)
    m = _mask2d(mask, img.shape[:2])[..., None] * float(alpha)
    out = img * (1.0 - m) + _rgb(color)[None, None, :] * m
    return to_uint8(out)


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion; outside the image counts as background."""
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean inner boundary of `mask > 0.5`, `thickness` pixels wide."""
    m = squeeze2d(mask)
    m = (m > 127) if m.dtype == np.uint8 and m.max(initial=0) > 1 else (m.astype(np.float32) > 0.5)
    inner = m
    for _ in range(max(1, int(thickness))):
        inner = _erode(inner)
    return m & ~inner


def contour_overlay(image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None,
                    thickness: int = 1, gt_color: Color = "green", pred_color: Color = "red",
                    both_color: Color = "yellow") -> np.ndarray:
    """Ground-truth contour in green and predicted contour in red (yellow where they coincide)."""
    img = as_float_rgb(image).copy()
    h, w = img.shape[:2]
    g = contour(_mask2d(gt, (h, w)), thickness) if gt is not None else np.zeros((h, w), bool)
    p = contour(_mask2d(pred, (h, w)), thickness) if pred is not None else np.zeros((h, w), bool)
    img[g & ~p] = _rgb(gt_color)
    img[p & ~g] = _rgb(pred_color)
    img[g & p] = _rgb(both_color)
    return to_uint8(img)


def jet(values: np.ndarray) -> np.ndarray:
    """Jet-like colormap: values in [0,1] → float RGB (dark blue → cyan → yellow → dark red)."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centers = np.asarray([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue peaks
    return np.clip(1.5 - np.abs(4.0 * x - 4.0 * centers), 0.0, 1.0)


def heatmap(image: np.ndarray, prob_map: np.ndarray, alpha: float = 0.5, normalize: bool = False) -> np.ndarray:
    """Blend a jet-coloured `prob_map` [h,w] (resized to the image) over `image`: (1−α)·image + α·jet(p).

    `normalize=True` stretches the map's min..max to 0..1 first (for similarity maps not in [0,1]).
    """
    img = as_float_rgb(image)
    p = squeeze2d(np.asarray(prob_map, dtype=np.float32))
    if p.ndim != 2:
        raise ValueError(f"expected a map [H,W], got shape {np.asarray(prob_map).shape}")
    p = np.nan_to_num(p)
    if normalize:
        lo, hi = float(p.min(initial=0.0)), float(p.max(initial=0.0))
        p = (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)
    if p.shape != img.shape[:2]:
        p = _resize_float(p, img.shape[:2])
    out = (1.0 - alpha) * img + alpha * jet(p)
    return to_uint8(out)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an image array as PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(array)).save(path, format="PNG")
    return path


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of an image array."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(array)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_data_uri(array: np.ndarray) -> str:
    """`data:image/png;base64,...` for an image array (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def figure_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None,
                row_titles: Sequence[str] | None = None, pad: int = 4, scale: int = 1,
                font_size: int = 12) -> np.ndarray:
    """Tile images into one uint8 array: column `titles` on top, `row_titles` on the left, white gaps.

    Cells take the largest image size; smaller images are centred. `scale` enlarges every image
    (nearest neighbour) for small inputs.
    """
    tiles = [[to_uint8(a) for a in row] for row in rows]
    if not tiles or not any(tiles):
        raise ValueError("figure_grid needs at least one image")
    if scale > 1:
        tiles = [[np.repeat(np.repeat(t, scale, 0), scale, 1) for t in row] for row in tiles]
    ch = max(t.shape[0] for row in tiles for t in row)
    cw = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    font = _font(font_size)
    line = font_size + 6
    top = line + pad if titles else pad
    left = 0
    if row_titles:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = max(int(probe.textlength(str(t), font=font)) for t in row_titles) + 2 * pad
    height = top + len(tiles) * (ch + pad)
    width = left + pad + ncols * (cw + pad)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, t in enumerate(row):
            y = top + r * (ch + pad) + (ch - t.shape[0]) // 2
            x = left + pad + c * (cw + pad) + (cw - t.shape[1]) // 2
            canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
    if titles or row_titles:
        im = Image.fromarray(canvas)
        draw = ImageDraw.Draw(im)
        for c, title in enumerate(titles or []):
            tw = draw.textlength(str(title), font=font)
            draw.text((left + pad + c * (cw + pad) + (cw - tw) / 2, pad / 2), str(title), fill=(20, 20, 20), font=font)
        for r, title in enumerate(row_titles or []):
            y = top + r * (ch + pad) + ch / 2 - font_size / 2
            draw.text((pad, y), str(title), fill=(20, 20, 20), font=font)
        canvas = np.asarray(im)
    return canvas
