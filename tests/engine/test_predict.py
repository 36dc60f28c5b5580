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
