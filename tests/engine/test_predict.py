"""predict_files on degenerate but valid images (issue 17, class 8): every size the readers accept is
predicted, and a failure while predicting leaves no output behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dusss.checkpoint import save_checkpoint
from dusss.engine import predict
from dusss.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = UNetConfig(base_width=4)
    path = tmp_path_factory.mktemp("seg") / "model.safetensors"
    save_checkpoint(path, UNet(cfg).state_dict(), "segmentation",
                    {"unet": dataclasses.asdict(cfg), "image_size": 32, "threshold": 0.5, "method": "supervised"})
    return path


def _png(path: Path, h: int, w: int) -> Path:
    Image.fromarray((np.arange(h * w).reshape(h, w) * 37 % 256).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 7), (7, 1), (2, 3)])
def test_tiny_and_thin_images_are_predicted_at_their_own_size(tmp_path: Path, model: Path, h: int, w: int) -> None:
    image = _png(tmp_path / "scan.png", h, w)
    (mask_path,) = predict.predict_files(model, [image], tmp_path / "out", device="cpu")
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    overlay = np.asarray(Image.open(tmp_path / "out" / "scan_overlay.png"))
    assert overlay.shape == (h, w, 3)


def test_a_failure_while_predicting_writes_nothing(tmp_path: Path, model: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    images = [_png(tmp_path / "a.png", 8, 8), _png(tmp_path / "b.png", 8, 8)]
    calls = []

    def overlay_failing_on_the_second(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return np.zeros((8, 8, 3), np.uint8)

    monkeypatch.setattr(predict, "contour_overlay", overlay_failing_on_the_second)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        predict.predict_files(model, images, out, device="cpu")
    assert len(calls) == 2 and (not out.exists() or not any(out.iterdir()))


def test_prediction_resizes_the_image_as_training_does() -> None:
    """A large image is shrunk with the training resize (antialiased bilinear, `resize_image`), not a plain
    bilinear interpolation: on a fine stripe pattern the two differ, and the model must see the first."""
    import torch
    import torch.nn.functional as F

    from dusss.data.transforms import model_input, resize_image

    stripes = np.zeros((128, 128, 3), np.float32)
    stripes[:, 3::8] = stripes[:, 4::8] = 1.0  # 2 of every 8 columns, where a plain 8x bilinear samples (3.5 + 8k)
    x = model_input(stripes, 16)
    assert x.shape == (1, 3, 16, 16)
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), resize_image(stripes, 16))
    assert abs(float(x.mean()) - 0.25) < 0.05 and float(x.std()) < 0.05  # antialiased: the stripes' share
    plain = F.interpolate(torch.from_numpy(stripes.transpose(2, 0, 1))[None], size=(16, 16), mode="bilinear",
                          align_corners=False)
    assert float(plain.min()) > 0.99  # what predict used to feed the model: all stripe, aliased

    class Probe(torch.nn.Module):  # returns its input's first channel as logits, to see what predict fed it
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t[:, :1] * 0 + torch.logit(t[:, :1].clamp(1e-4, 1 - 1e-4))

    prob = predict.predict_probability(Probe(), stripes, 16, torch.device("cpu"))
    assert prob.shape == (128, 128) and abs(float(prob.mean()) - 0.25) < 0.05 and float(prob.std()) < 0.05


def test_nifti_images_get_nifti_masks_in_their_world_space(tmp_path: Path, model: Path) -> None:
    """A NIfTI image's mask is NAME_mask.nii.gz with the image's geometry: a 2-D file's affine, or for a slice
    of a volume the volume's affine moved to that slice; its voxels are the PNG mask's (0/1)."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    affine = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    volume = (rng.random((20, 24, 5)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "vol.nii.gz"))
    nib.save(nib.Nifti1Image(volume[:, :, 3], affine), str(tmp_path / "flat.nii"))
    Image.fromarray(((volume[:, :, 3] - volume[:, :, 3].min()) * 255 // np.ptp(volume[:, :, 3])).astype(np.uint8)
                    ).save(tmp_path / "flat_as.png")
    written = predict.predict_files(model, [f"{tmp_path}/vol.nii.gz#slice=3", tmp_path / "flat.nii"],
                                    tmp_path / "out", device="cpu")
    assert [p.name for p in written] == ["vol_slice3_mask.nii.gz", "flat_mask.nii.gz"]
    sliced, flat = (nib.load(str(p)) for p in written)
    assert sliced.shape == (20, 24, 1) and flat.shape == (20, 24)
    moved = affine.copy()
    moved[:3, 3] += 3 * affine[:3, 2]  # voxel (i, j, 0) of the mask is voxel (i, j, 3) of the volume
    np.testing.assert_allclose(sliced.affine, moved)
    np.testing.assert_allclose(flat.affine, affine)
    a, b = np.asarray(sliced.dataobj)[:, :, 0], np.asarray(flat.dataobj)
    assert a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1} and np.array_equal(a, b)  # the same slice
    (png,) = predict.predict_files(model, [tmp_path / "flat_as.png"], tmp_path / "png", device="cpu")
    assert png.name == "flat_as_mask.png" and (tmp_path / "out" / "vol_slice3_overlay.png").is_file()
