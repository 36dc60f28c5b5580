"""Image and mask readers, chosen by file extension through a small registry.

A reader takes `(path, index)` and returns the raw array (H,W) or (H,W,C) in its stored dtype; `index`
is the slice/frame requested with a `#slice=N` suffix (`scan.nii.gz#slice=12`), None for the default
(the middle slice of a volume). Each reader is registered with a scaling policy used by `read_image`:
``"dtype"`` divides integers by their dtype's maximum (8-bit /255, 16-bit /65535; photographs),
``"minmax"`` maps the image's own min..max to 0..1 (NIfTI, DICOM: CT/MR intensities have no fixed range).
Float images already inside [0,1] are kept as they are under both policies.

NIfTI arrays are used as stored (axis 0 = image rows), so an array saved with nibabel reads back
unchanged. NIfTI needs `nibabel`, DICOM `pydicom` (`pip install dusss[medical]`).

Size limit: one image, slice or frame may have at most `max_pixels()` pixels, Pillow's
`PIL.Image.MAX_IMAGE_PIXELS` (about 89 M; set it to change the limit for every format, None for none). Every
built-in reader checks the size its header declares before it decodes any pixel data, so a small file that
declares a huge image fails at once with a DataError naming it; NIfTI and DICOM decode only the requested
slice or frame.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dusss.errors import DataError
from dusss.registry import Registry

ReaderFn = Callable[[Path, "int | None"], np.ndarray]


@dataclass(frozen=True)
class _Entry:
    fn: ReaderFn
    scale: str


READERS: Registry[_Entry] = Registry("image file extension")


def register_reader(exts: Iterable[str], fn: ReaderFn, scale: str = "dtype") -> None:
    """Register `fn(path, index) -> raw array` for extensions like ".png" or ".nii.gz".

    `fn` should call `check_pixels(path, height, width)` with the size its header declares before decoding;
    the decoded array is checked against `max_pixels()` in any case."""
    if scale not in ("dtype", "minmax"):
        raise ValueError(f"scale must be 'dtype' or 'minmax', got {scale!r}")
    for ext in exts:
        e = ext.lower() if ext.startswith(".") else "." + ext.lower()
        READERS.remove(e)  # a later registration of an extension replaces the earlier one
        READERS.add(e, _Entry(fn, scale))


def known_extensions() -> list[str]:
    """Registered extensions, sorted."""
    return READERS.names()


def split_path(path: str | Path) -> tuple[Path, int | None]:
    """Split `file.nii.gz#slice=12` into (file, 12); a path without suffix gives (path, None)."""
    s = str(path)
    if "#" not in s:
        return Path(s), None
    file_part, _, frag = s.rpartition("#")
    key, _, value = frag.partition("=")
    if key.strip() != "slice" or not value.strip().lstrip("-").isdigit():
        raise DataError(file_part, f"bad suffix '#{frag}' (expected '#slice=N')")
    return Path(file_part), int(value)


def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(READERS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def max_pixels() -> int | None:
    """Most pixels per image, slice or frame: `PIL.Image.MAX_IMAGE_PIXELS` (None: no limit)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def check_pixels(path: str | Path, height: int, width: int) -> None:
    """DataError naming `path` when a declared `height` x `width` image is over `max_pixels()`."""
    limit = max_pixels()
    if limit is not None and int(height) * int(width) > limit:
        raise _too_large(path, f"{int(height)}x{int(width)} = {int(height) * int(width)} pixels")


def _too_large(path: str | Path, declared: str) -> DataError:
    return DataError(path, f"image declares {declared}, over the limit of {max_pixels()} pixels "
                           "(PIL.Image.MAX_IMAGE_PIXELS; raise it if the file is genuine)")


def _read_raw(path: str | Path) -> tuple[np.ndarray, str, Path]:
    file, index = split_path(path)
    ext = _extension(file)
    entry = READERS.get(ext)
    if entry is None:
        shown = ext or "(none)"
        raise DataError(file, f"unknown image extension {shown} (known: {', '.join(known_extensions())})")
    if not file.exists():
        raise DataError(file, "file not found")
    if not file.is_file():
        raise DataError(file, "not a file")
    if file.stat().st_size == 0:
        raise DataError(file, "file is empty (0 bytes)")
    try:
        arr = np.asarray(entry.fn(file, index))
    except DataError:
        raise
    except ImportError as exc:
        raise DataError(file, f"cannot read this format: {exc}") from None
    except MemoryError:
        raise DataError(file, "not enough memory to decode this image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt file for the user
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(file, f"cannot decode image ({detail})") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise DataError(file, f"unsupported array shape {tuple(arr.shape)} (expected HxW or HxWx3/4)")
    check_pixels(file, arr.shape[0], arr.shape[1])  # a registered reader that does not check its header
    return arr, entry.scale, file


def _to_unit(arr: np.ndarray, scale: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return a
        return _minmax(a)
    if scale == "dtype" and arr.dtype in (np.uint8, np.uint16):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    return _minmax(arr.astype(np.float32))


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as float32 [H,W,3] in [0,1] (gray repeated, alpha dropped); DataError if unusable."""
    arr, scale, _ = _read_raw(path)
    if arr.ndim == 3:
        arr = arr[:, :, :3]
    out = _to_unit(arr, scale)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _fmt_values(values: np.ndarray) -> str:
    shown = [str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in values[:6]]
    more = f", ... ({len(values)} distinct)" if len(values) > 6 else ""
    return "{" + ", ".join(shown) + more + "}"


def _constant(plane: np.ndarray) -> bool:
    return bool(plane.size == 0 or (plane == plane.flat[0]).all())


def _mask_plane(arr: np.ndarray, file: Path) -> tuple[np.ndarray, str]:
    """The one plane a mask is read from, and where it came from (the rule is in `read_mask`)."""
    if arr.ndim == 2:
        return arr, ""
    rgb = arr[:, :, :3]
    alpha = arr[:, :, 3] if arr.shape[2] == 4 else None
    uniform_colour = all(_constant(rgb[:, :, c]) for c in range(3))
    if alpha is not None and uniform_colour and (not _constant(alpha) or not alpha.any()):
        return alpha, " (read from the alpha channel)"
    if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
        raise DataError(file, "mask is not binary: its colour channels differ (save it as grayscale)")
    gray = rgb[:, :, 0]
    if alpha is not None and not _constant(alpha) and not np.array_equal(gray != 0, alpha != 0):
        raise DataError(
            file,
            "ambiguous mask: its gray levels and its alpha channel both vary and draw different masks "
            "(save the mask as single-channel grayscale)",
        )
    return gray, ""


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a binary mask as uint8 [H,W] in {0,1}; values must be a subset of {0,1} or of {0,255}.

    Masks with several channels (RGB, RGBA, gray + alpha) are read from one plane:
    the alpha channel when every colour channel is constant and alpha varies (a lesion drawn only in alpha,
    on a uniform colour) or is 0 everywhere (a fully transparent mask is empty, whatever its hidden colour);
    otherwise the gray level, which needs equal R, G and B. When both the gray level and the alpha channel
    vary they must draw the same mask (nonzero in the same pixels), else the mask is ambiguous and refused.
    Any other constant alpha (opaque or not) is ignored.
    """
    arr, _, file = _read_raw(path)
    arr, source = _mask_plane(arr, file)
    values = np.unique(arr)
    if values.size and values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(file, "mask is not binary: it contains NaN or infinite values")
    vset = {float(v) for v in values}
    if vset <= {0.0, 1.0}:
        return (arr != 0).astype(np.uint8)
    if vset <= {0.0, 255.0}:
        return (arr != 0).astype(np.uint8)
    hint = " (lossy JPEG masks are never binary; use PNG)" if file.suffix.lower() in (".jpg", ".jpeg") else ""
    raise DataError(file, f"mask is not binary: values {_fmt_values(values)}{source}{hint}")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, decoding it."""
    arr, _, _ = _read_raw(path)
    return int(arr.shape[0]), int(arr.shape[1])


# ---- built-in readers ---------------------------------------------------------------------------------


def _open_pillow(path: Path) -> object:
    """`Image.open` with our size message instead of Pillow's decompression-bomb error and warning."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file named
        try:
            return Image.open(path)
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(path, f"{found.group(1)} pixels" if found else "too many pixels") from None


def _read_pillow(path: Path, index: int | None) -> np.ndarray:
    from PIL import Image

    with _open_pillow(path) as img:  # type: ignore[attr-defined]
        check_pixels(path, img.height, img.width)
        if index is not None:
            img.seek(index)
            check_pixels(path, img.height, img.width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(img).astype(np.uint16)
        if mode == "I":
            a = np.asarray(img)
            if a.size and a.min() >= 0 and a.max() <= 65535:
                return a.astype(np.uint16)
            return a
        if mode == "F":
            return np.asarray(img, dtype=np.float32)
        if mode in ("L", "RGB", "RGBA"):
            return np.asarray(img)
        if mode == "1":
            return np.asarray(img.convert("L"))
        if "A" in img.getbands() or "a" in img.getbands():  # LA, PA, La, RGBa: keep the alpha (masks use it)
            return np.asarray(img.convert("RGBA"))
        if mode == "P":
            converted = img.convert("RGBA" if "transparency" in img.info else "RGB")
            return np.asarray(converted)
        return np.asarray(img.convert("RGB"))


def _slice_of(shape: tuple[int, ...], index: int | None, path: Path) -> tuple[int | slice, ...]:
    """The indexing tuple of one 2-D slice of a volume of `shape` (trailing singleton axes beyond 3 ignored)."""
    ndim = len(shape)
    while ndim > 3 and shape[ndim - 1] == 1:
        ndim -= 1
    if ndim not in (2, 3):
        raise DataError(path, f"unsupported {ndim}-D volume of shape {tuple(shape)}")
    check_pixels(path, shape[0], shape[1])
    rest = (0,) * (len(shape) - ndim)
    if ndim == 2:
        if index not in (None, 0):
            raise DataError(path, f"slice {index} requested but the image is 2-D")
        return (slice(None), slice(None), *rest)
    n = shape[2]
    i = n // 2 if index is None else index
    if not 0 <= i < n:
        raise DataError(path, f"slice {index} out of range (the volume has {n} slices)")
    return (slice(None), slice(None), i, *rest)


def _read_nifti(path: Path, index: int | None) -> np.ndarray:
    try:
        import nibabel
    except ImportError:
        raise DataError(path, "reading NIfTI needs nibabel: pip install 'dusss[medical]'") from None
    img = nibabel.load(str(path))  # the header only: the data is read below, one slice of it
    where = _slice_of(tuple(int(s) for s in img.shape), index, path)
    return np.asarray(img.dataobj[where])


def is_nifti(path: str | Path) -> bool:
    """True for a NIfTI file (`.nii`, `.nii.gz`), with or without a `#slice=N` suffix."""
    name = split_path(path)[0].name.lower()
    return name.endswith((".nii", ".nii.gz"))


def nifti_slice_affine(path: str | Path) -> tuple[np.ndarray, bool]:
    """(voxel-to-world affine of the 2-D slice that `read_image(path)` returns, whether the file is a volume).

    The slice [i, j] of a volume is voxel (i, j, k) (`_slice_of`: the middle slice, or `#slice=k`), so its
    affine is the volume's with the origin moved k steps along the third voxel axis; a 2-D file keeps its own."""
    import nibabel

    file, index = split_path(path)
    img = nibabel.load(str(file))
    affine = np.array(img.affine, dtype=np.float64)
    where = _slice_of(tuple(int(n) for n in img.shape), index, file)
    volume = len(where) > 2 and isinstance(where[2], int)
    if volume:
        affine[:3, 3] += affine[:3, 2] * int(where[2])
    return affine, volume


def _read_dicom(path: Path, index: int | None) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise DataError(path, "reading DICOM needs pydicom: pip install 'dusss[medical]'") from None
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)  # the header: pixel data is decoded below
    check_pixels(path, int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    i = None
    if frames > 1:
        i = frames // 2 if index is None else index
        if not 0 <= i < frames:
            raise DataError(path, f"frame {index} out of range (the file has {frames} frames)")
    elif index not in (None, 0):
        raise DataError(path, f"frame {index} requested but the file has one frame")
    arr = _dicom_pixels(pydicom, path, i)
    if samples == 1:
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if slope != 1 or intercept != 0:
            arr = arr.astype(np.float64) * slope + intercept
        if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = arr.max() - arr
    return arr


def _dicom_pixels(pydicom: object, path: Path, frame: int | None) -> np.ndarray:
    """Frame `frame` (None: the only one) of a DICOM file; pydicom >= 3 decodes that frame alone."""
    try:
        from pydicom.pixels import pixel_array
    except ImportError:  # pydicom 2: the whole pixel data, then the frame
        arr = np.asarray(pydicom.dcmread(str(path)).pixel_array)  # type: ignore[attr-defined]
        return arr if frame is None else arr[frame]
    return np.asarray(pixel_array(str(path), index=frame))


register_reader([".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"], _read_pillow, scale="dtype")
register_reader([".nii", ".nii.gz"], _read_nifti, scale="minmax")
register_reader([".dcm"], _read_dicom, scale="minmax")
