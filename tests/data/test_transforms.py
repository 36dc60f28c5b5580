from __future__ import annotations

import numpy as np
import pytest

from dusss.data.transforms import (
    GeoParams,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    affine,
    apply_geometric,
    flip,
    random_geometric,
    random_intensity,
    resize_image,
    resize_mask,
    rot90,
    sample_geometric,
)


def _pair(h: int = 9, w: int = 9) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[1:4, 5:8] = 1  # upper right block
    image = np.repeat(mask[..., None].astype(np.float32), 3, axis=2)
    image[..., 1] = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    return image, mask


def test_resize_shapes_and_values() -> None:
    img = np.full((10, 20, 3), 0.25, dtype=np.float32)
    out = resize_image(img, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)
    assert resize_image(img, (5, 7)).shape == (5, 7, 3)
    m = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    assert np.array_equal(resize_mask(m, 4), np.kron(m, np.ones((2, 2), dtype=np.uint8)))
    big = np.kron(m, np.ones((8, 8), dtype=np.uint8))
    assert np.array_equal(resize_mask(big, 2), m)
    assert resize_image(img, (10, 20)) is not None and resize_mask(m, 2).dtype == np.uint8


def test_rot90_and_flip_move_image_and_mask_together() -> None:
    image, mask = _pair()
    for k in range(4):
        i2, m2 = rot90(image, mask, k)
        assert np.array_equal(i2[..., 0] > 0.5, m2.astype(bool))
        assert np.array_equal(m2, np.rot90(mask, k))
    for axis in (0, 1):
        i2, m2 = flip(image, mask, axis)
        assert np.array_equal(i2[..., 0] > 0.5, m2.astype(bool))
    _, m2 = flip(image, mask, 1)
    assert m2[1:4, 1:4].all() and m2.sum() == 9  # upper right -> upper left


def test_affine_identity_and_quarter_turn() -> None:
    image, mask = _pair()
    i0, m0 = affine(image, mask, 0.0)
    np.testing.assert_allclose(i0, image, atol=1e-6)
    assert np.array_equal(m0, mask)
    i90, m90 = affine(image, mask, 90.0)
    np.testing.assert_allclose(i90, np.rot90(image), atol=1e-5)
    assert np.array_equal(m90, np.rot90(mask))


def test_small_rotation_keeps_pairing_and_zero_fills() -> None:
    image, mask = _pair(33, 33)
    i2, m2 = affine(image, mask, 15.0)
    agree = ((i2[..., 0] > 0.5) == m2.astype(bool)).mean()
    assert agree > 0.97 and set(np.unique(m2)) <= {0, 1}
    ones = np.ones((16, 16, 3), dtype=np.float32)
    rotated, _ = affine(ones, None, 45.0)
    assert rotated[0, 0, 0] == 0.0 and rotated[8, 8, 0] == pytest.approx(1.0)
    centre = np.zeros((33, 33), dtype=np.uint8)
    centre[14:19, 14:19] = 1  # 5x5 around the centre pixel 16
    _, zm = affine(ones[:1, :1].repeat(33, 0).repeat(33, 1), centre, 0.0, scale=2.0)
    assert zm.sum() == 11 * 11 and zm[16, 16] == 1  # offsets -5..5 sample -2.5..2.5, rint to even keeps +-2


def test_random_geometric_is_seeded() -> None:
    image, mask = _pair(17, 17)
    for policy in ("text_safe", "lvit"):
        a = random_geometric(image, mask, np.random.default_rng(3), policy)
        b = random_geometric(image, mask, np.random.default_rng(3), policy)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    params = [sample_geometric(np.random.default_rng(s)) for s in range(40)]
    assert all(p.k == 0 and p.flip in (None, 1) for p in params)  # text_safe: no rot90, no vertical flip
    assert any(p.hflip for p in params) and any(not p.hflip for p in params)
    assert all(abs(p.angle) <= 20 for p in params)
    lvit = [sample_geometric(np.random.default_rng(s), "lvit") for s in range(40)]
    assert any(p.k for p in lvit)
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        sample_geometric(np.random.default_rng(0), "wild")


def test_hflip_property_and_apply() -> None:
    assert GeoParams(flip=1).hflip and GeoParams(k=2, flip=0).hflip
    assert not GeoParams(k=1, flip=1).hflip and not GeoParams(flip=0).hflip and not GeoParams().hflip
    image, mask = _pair()
    i1, m1 = apply_geometric(image, mask, GeoParams(k=2, flip=0))
    i2, m2 = flip(image, mask, 1)
    assert np.array_equal(m1, m2) and np.array_equal(i1, i2)


def test_intensity_ops() -> None:
    img = np.array([[[0.2] * 3, [0.6] * 3]], dtype=np.float32)
    np.testing.assert_allclose(adjust_brightness(img, 0.5)[0, :, 0], [0.7, 1.0])
    np.testing.assert_allclose(adjust_contrast(img, 2.0)[0, :, 0], [0.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(adjust_gamma(img, 2.0)[0, :, 0], [0.04, 0.36], atol=1e-6)
    rng_img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    a = random_intensity(rng_img, np.random.default_rng(1))
    b = random_intensity(rng_img, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
