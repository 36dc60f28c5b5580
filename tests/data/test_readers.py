from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.data import readers
from dusss.data.readers import read_image, read_mask, register_reader, split_path
from dusss.errors import DataError

from .builders import box_mask, write_png, write_png_declaring


def test_gray_png_is_repeated_to_rgb_and_scaled(tmp_path: Path) -> None:
    arr = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    img = read_image(write_png(tmp_path / "g.png", arr))
    assert img.dtype == np.float32 and img.shape == (2, 2, 3)
    np.testing.assert_allclose(img[:, :, 0], [[0.0, 0.2], [0.4, 1.0]], atol=1e-6)
    assert np.array_equal(img[:, :, 0], img[:, :, 2])


def test_rgb_and_rgba_keep_colour_and_drop_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 255, 0, 51, 7
    img = read_image(write_png(tmp_path / "c.png", rgba))
    np.testing.assert_allclose(img[0, 0], [1.0, 0.0, 0.2], atol=1e-6)
    img_rgb = read_image(write_png(tmp_path / "c.bmp", rgba[..., :3]))
    np.testing.assert_allclose(img_rgb[0, 0], [1.0, 0.0, 0.2], atol=1e-6)


@pytest.mark.parametrize("ext", [".tif", ".png"])
def test_16bit_is_scaled_by_the_dtype_maximum(tmp_path: Path, ext: str) -> None:
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    img = read_image(write_png(tmp_path / f"x{ext}", arr))
    np.testing.assert_allclose(img[:, :, 1], arr / 65535.0, rtol=1e-6)


def test_jpeg_reads_approximately(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path, quality=95)
    img = read_image(path)
    assert img.shape == (8, 8, 3) and abs(float(img.mean()) - 128 / 255) < 0.02


def test_float_tif_outside_unit_range_is_min_max_scaled(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[-100.0, 0.0], [100.0, 300.0]], dtype=np.float32)).save(path)
    np.testing.assert_allclose(read_image(path)[:, :, 0], [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_round_trip_2d_and_slices_of_3d(tmp_path: Path, ext: str) -> None:
    nib = pytest.importorskip("nibabel")
    arr2 = np.array([[0.0, 50.0, 100.0], [25.0, 75.0, 100.0]], dtype=np.float32)
    p2 = tmp_path / f"two{ext}"
    nib.save(nib.Nifti1Image(arr2, np.eye(4)), str(p2))
    np.testing.assert_allclose(read_image(p2)[:, :, 0], arr2 / 100.0, atol=1e-6)
    vol = np.stack([np.full((4, 5), v, dtype=np.int16) for v in (0, 1, 2)], axis=2)
    vol[0, 0, :] = -10  # min-max per slice: the corner maps to 0, the rest of slice 1 to 1
    p3 = tmp_path / f"vol{ext}"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(p3))
    mid = read_image(p3)  # middle slice (index 1)
    assert mid.shape == (4, 5, 3) and mid[0, 0, 0] == 0.0 and mid[1, 1, 0] == 1.0
    mask_vol = (np.arange(60).reshape(4, 5, 3) % 2).astype(np.uint8)
    pm = tmp_path / f"mask{ext}"
    nib.save(nib.Nifti1Image(mask_vol, np.eye(4)), str(pm))
    assert np.array_equal(read_mask(f"{pm}#slice=2"), mask_vol[:, :, 2])
    with pytest.raises(DataError, match="slice 3 out of range"):
        read_mask(f"{pm}#slice=3")


def test_dicom_is_read_with_rescale(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 100).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 3, 4, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == 3
    np.testing.assert_allclose(read_image(path)[:, :, 0], arr / 1100.0, atol=1e-6)


@pytest.mark.parametrize("scale", [1, 255])
def test_mask_values_are_normalised(tmp_path: Path, scale: int) -> None:
    m = box_mask(6, 6, (1, 3, 2, 5))
    out = read_mask(write_png(tmp_path / "m.png", m * scale))
    assert out.dtype == np.uint8 and np.array_equal(out, m)


def test_all_zero_and_rgb_gray_masks_are_accepted(tmp_path: Path) -> None:
    assert read_mask(write_png(tmp_path / "z.png", np.zeros((4, 4), np.uint8))).sum() == 0
    rgb = np.repeat(box_mask(4, 4, (0, 2, 0, 2))[..., None] * 255, 3, axis=2)
    assert read_mask(write_png(tmp_path / "rgb.png", rgb)).sum() == 4


def test_non_binary_mask_names_the_values(tmp_path: Path) -> None:
    path = write_png(tmp_path / "m.png", np.array([[0, 128], [255, 0]], dtype=np.uint8))
    with pytest.raises(DataError) as err:
        read_mask(path)
    assert str(err.value) == f"{path}: mask is not binary: values {{0, 128, 255}}"


def test_many_mask_values_are_abbreviated(tmp_path: Path) -> None:
    path = write_png(tmp_path / "m.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    with pytest.raises(DataError, match=r"values \{0, 1, 2, 3, 4, 5, \.\.\. \(64 distinct\)\}"):
        read_mask(path)


def test_coloured_mask_is_rejected(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    with pytest.raises(DataError, match="colour channels differ"):
        read_mask(write_png(tmp_path / "m.png", rgb))


def test_bad_files_give_one_line_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png" * 10)
    good = write_png(
        tmp_path / "good.png", np.zeros((64, 64), dtype=np.uint8) + np.arange(64, dtype=np.uint8)
    )
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    unknown = tmp_path / "scan.xyz"
    unknown.write_bytes(b"abc")
    cases = [
        (empty, "file is empty (0 bytes)"),
        (garbage, "cannot decode image"),
        (truncated, "cannot decode image"),
        (tmp_path / "missing.png", "file not found"),
        (unknown, "unknown image extension .xyz"),
    ]
    for path, message in cases:
        for fn in (read_image, read_mask):
            with pytest.raises(DataError) as err:
                fn(path)
            assert str(err.value).startswith(f"{path}: "), str(err.value)
            assert message in str(err.value) and "\n" not in str(err.value)


def test_split_path_and_bad_suffix(tmp_path: Path) -> None:
    assert split_path("a/b.nii.gz#slice=12") == (Path("a/b.nii.gz"), 12)
    assert split_path("a/b.png") == (Path("a/b.png"), None)
    with pytest.raises(DataError, match="bad suffix"):
        split_path("a/b.nii#frame=2")


def test_register_reader_adds_an_extension(tmp_path: Path) -> None:
    def read_npy(path: Path, index: int | None) -> np.ndarray:
        return np.load(path)

    register_reader([".npy"], read_npy)
    try:
        path = tmp_path / "x.npy"
        np.save(path, np.array([[0, 255]], dtype=np.uint8))
        np.testing.assert_allclose(read_image(path)[0, :, 0], [0.0, 1.0])
        assert np.array_equal(read_mask(path), [[0, 1]])
    finally:
        readers.READERS.remove(".npy")


# --- masks with an alpha channel (issue 17, class 4) ---------------------------------------------------------


def _rgba(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.dstack([gray, gray, gray, alpha]).astype(np.uint8)


def test_lesion_drawn_only_in_alpha_is_read_from_alpha(tmp_path: Path) -> None:
    lesion = box_mask(6, 8, (1, 4, 2, 6))
    rgba = write_png(tmp_path / "rgba.png", _rgba(np.zeros((6, 8)), lesion * 255))
    assert np.array_equal(read_mask(rgba), lesion)  # it used to read as an empty mask
    la = tmp_path / "la.png"
    Image.fromarray(np.dstack([np.full((6, 8), 255), lesion * 255]).astype(np.uint8), mode="LA").save(la)
    assert np.array_equal(read_mask(la), lesion)
    red = np.zeros((6, 8, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, lesion * 255  # a uniform colour, the lesion in alpha
    assert np.array_equal(read_mask(write_png(tmp_path / "red.png", red)), lesion)
    blank = write_png(tmp_path / "blank.png", _rgba(np.full((6, 8), 255), np.zeros((6, 8))))  # transparent white
    assert read_mask(blank).sum() == 0


def test_gray_lesion_with_constant_or_matching_alpha_is_read_from_gray(tmp_path: Path) -> None:
    lesion = box_mask(5, 5, (0, 2, 1, 4))
    opaque = write_png(tmp_path / "opaque.png", _rgba(lesion * 255, np.full((5, 5), 255)))
    assert np.array_equal(read_mask(opaque), lesion)
    cut_out = write_png(tmp_path / "cut.png", _rgba(lesion * 255, lesion * 255))  # transparent background
    assert np.array_equal(read_mask(cut_out), lesion)


def test_gray_and_alpha_drawing_different_masks_is_refused(tmp_path: Path) -> None:
    path = write_png(tmp_path / "both.png",
                     _rgba(box_mask(5, 5, (0, 2, 0, 2)) * 255, box_mask(5, 5, (3, 5, 3, 5)) * 255))
    with pytest.raises(DataError) as err:
        read_mask(path)
    assert str(err.value).startswith(f"{path}: ambiguous mask") and "\n" not in str(err.value)
    soft = write_png(tmp_path / "soft.png", _rgba(np.zeros((2, 2)), np.array([[0, 128], [255, 0]])))
    with pytest.raises(DataError, match=r"values \{0, 128, 255\} \(read from the alpha channel\)"):
        read_mask(soft)


def test_alpha_is_still_dropped_from_images(tmp_path: Path) -> None:
    la = tmp_path / "la.png"
    Image.fromarray(np.dstack([np.full((2, 2), 51), np.array([[0, 255], [255, 0]])]).astype(np.uint8),
                    mode="LA").save(la)
    np.testing.assert_allclose(read_image(la), np.full((2, 2, 3), 0.2), atol=1e-6)


# --- the pixel limit, checked from the header before any pixel is decoded (issue 17, class 6) ----------------


def _nifti_declaring(path: Path, height: int, width: int) -> Path:
    """A 4x4 NIfTI whose header claims `height` x `width` (the data stays 16 bytes)."""
    import gzip
    import struct

    nib = pytest.importorskip("nibabel")
    small = path.with_name("small.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), str(small))
    data = bytearray(small.read_bytes())
    struct.pack_into("<8h", data, 40, 2, height, width, 1, 1, 1, 1, 1)  # dim[0..7]
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


def _dicom_declaring(path: Path, rows: int, columns: int) -> Path:
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros(16, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("name", ["bomb.png", "bomb.nii", "bomb.nii.gz", "bomb.dcm"])
def test_a_header_declaring_too_many_pixels_is_refused_before_decoding(tmp_path: Path, name: str) -> None:
    make = {".png": write_png_declaring, ".dcm": _dicom_declaring}.get(Path(name).suffix, _nifti_declaring)
    path = make(tmp_path / name, 20000, 20000)
    assert path.stat().st_size < 10_000
    for fn in (read_image, read_mask):
        with pytest.raises(DataError) as err:
            fn(path)
        message = str(err.value)
        assert message.startswith(f"{path}: image declares ") and "400000000 pixels" in message, message
        assert "over the limit of 89478485 pixels" in message and "\n" not in message


def test_the_limit_is_pillows_and_applies_to_every_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15)
    assert readers.max_pixels() == 15
    png = write_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    nii = _nifti_declaring(tmp_path / "x.nii", 4, 4)
    for path in (png, nii, _dicom_declaring(tmp_path / "x.dcm", 4, 4)):
        with pytest.raises(DataError, match=r"declares 4x4 = 16 pixels, over the limit of 15 pixels"):
            read_image(path)
    ok = write_png(tmp_path / "ok.png", np.zeros((3, 5), np.uint8))
    assert read_image(ok).shape == (3, 5, 3)
