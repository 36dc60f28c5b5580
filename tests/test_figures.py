"""Overlays, contours, heat-maps, PNG output and grids at known pixels."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.figures import (
    contour,
    contour_overlay,
    figure_grid,
    heatmap,
    jet,
    overlay,
    png_data_uri,
    save_png,
)


def _grey(h: int = 6, w: int = 6, v: float = 0.5) -> np.ndarray:
    return np.full((h, w, 3), v, dtype=np.float32)


def test_overlay_blends_colour_inside_the_mask_only() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 1
    out = overlay(_grey(), mask, color=(1.0, 0.0, 0.0), alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (6, 6, 3)
    assert out[1, 1].tolist() == [191, 64, 64]  # 0.5·0.5 + 0.5·(1,0,0) = (0.75, 0.25, 0.25)
    assert out[5, 5].tolist() == [128, 128, 128]
    # 0/255 masks, bool masks and uint8 images are accepted; named colours too
    out2 = overlay((_grey() * 255).astype(np.uint8), mask.astype(bool) * 255, color="red", alpha=0.5)
    assert out2[1, 1].tolist() == [191, 64, 64]
    with pytest.raises(ValueError):
        overlay(_grey(), np.zeros((2, 2, 2)))


def test_contour_overlay_colours() -> None:
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros((8, 8), np.uint8)
    pred[2:6, 2:7] = 1
    edge = contour(gt)
    assert edge[2, 2] and edge[2, 4] and not edge[3, 3] and not edge[0, 0]
    assert contour(np.ones((3, 3))).sum() == 8  # the image border counts as a boundary
    out = contour_overlay(_grey(8, 8, 0.2), gt, pred)
    assert out[2, 3].tolist() == [255, 255, 0]  # both contours: yellow
    assert out[3, 5].tolist() == [0, 255, 0]  # gt only (inside pred): green
    assert out[3, 6].tolist() == [255, 0, 0]  # pred only: red
    assert out[3, 3].tolist() == [51, 51, 51]  # interior untouched
    assert contour_overlay(_grey(8, 8), gt, None)[2, 2].tolist() == [0, 255, 0]


def test_heatmap_uses_a_jet_like_colormap() -> None:
    np.testing.assert_allclose(jet(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])
    prob = np.zeros((4, 4), np.float32)
    prob[0, 0] = 1.0
    out = heatmap(_grey(4, 4, 0.0), prob, alpha=1.0)
    assert out[0, 0].tolist() == [128, 0, 0]  # dark red at 1
    assert out[3, 3].tolist() == [0, 0, 128]  # dark blue at 0
    half = heatmap(_grey(4, 4, 1.0), prob, alpha=0.5)
    assert half[3, 3].tolist() == [128, 128, 191]  # 0.5·white + 0.5·(0,0,0.5)
    # maps of another size are resized; normalize stretches min..max
    big = heatmap(_grey(8, 8), np.linspace(-3, 3, 4)[None, :].repeat(4, 0), normalize=True)
    assert big.shape == (8, 8, 3)


def test_png_output_and_data_uri(tmp_path: Path) -> None:
    img = overlay(_grey(), np.eye(6))
    path = save_png(img, tmp_path / "a" / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), img)
    uri = png_data_uri(img)
    assert uri.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    assert np.array_equal(decoded, img)


def test_figure_grid_places_tiles_and_titles() -> None:
    red = np.zeros((10, 10, 3), np.float32)
    red[..., 0] = 1
    blue = np.zeros((6, 6, 3), np.float32)
    blue[..., 2] = 1
    grid = figure_grid([[red, blue], [blue]], titles=["image", "mask"], row_titles=["case 1", "case 2"], pad=2)
    assert grid.dtype == np.uint8 and grid.ndim == 3
    assert (np.all(grid == [255, 0, 0], axis=-1)).sum() == 100
    assert (np.all(grid == [0, 0, 255], axis=-1)).sum() == 72
    dark_text = (grid.sum(-1) < 200) & ~np.all(grid == [0, 0, 255], axis=-1)
    assert dark_text[:16].any()  # column titles drawn above the tiles
    plain = figure_grid([[red]], pad=0)
    assert plain.shape == (10, 10, 3)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1)])
def test_images_with_a_side_of_one_get_overlays_and_heatmaps(shape: tuple[int, int]) -> None:
    from dusss.figures import contour_overlay, heatmap, squeeze2d

    image = np.full((*shape, 3), 0.5, np.float32)
    mask = np.ones(shape, np.uint8)
    assert squeeze2d(mask[..., None]).shape == shape
    out = contour_overlay(image, mask, mask[None])  # [1,H,W] too
    assert out.shape == (*shape, 3) and (out == [255, 255, 0]).all()  # every pixel is on both contours
    assert heatmap(image, np.zeros(shape, np.float32)).shape == (*shape, 3)
