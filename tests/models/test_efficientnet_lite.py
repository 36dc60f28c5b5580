"""EfficientNet-Lite0: exact state-dict match with the packaged ImageNet weights, TF "same" padding, and an
honest ImageNet check on real photographs shipped with installed packages (no synthetic images)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dusss.models.efficientnet_lite import (
    Conv2dSame,
    EfficientNetLite0,
    efficientnet_lite0,
    pretrained_weights_path,
)

MILITARY_UNIFORM, PALACE, DAISY = 652, 698, 985  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return efficientnet_lite0(pretrained=True).eval()


def _photo(path: Path) -> torch.Tensor:
    """ImageNet evaluation preprocessing: bicubic resize of the short side to 256, center crop 224, [0,1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def test_state_dict_keys_and_shapes_match_package_file() -> None:
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    own = EfficientNetLite0().state_dict()
    assert set(own) == set(state)
    assert all(own[k].shape == state[k].shape for k in own)
    assert len(own) == 296


def test_block_layout_and_feature_shapes(model: EfficientNetLite0) -> None:
    assert len(model._blocks) == 16 and model.stride16_index == 10
    assert all(not hasattr(b, "_se_reduce") for b in model._blocks)  # no squeeze-excitation
    assert model._bn0.eps == 1e-3 and model._bn0.momentum == 0.01
    with torch.no_grad():
        f = model.forward_features(torch.rand(1, 3, 224, 224))
        assert f["stride16"].shape == (1, 112, 14, 14) and f["head"].shape == (1, 1280, 7, 7)
        f = model.forward_features(torch.rand(2, 3, 128, 128), head=False)
    assert set(f) == {"stride16"} and f["stride16"].shape == (2, 112, 8, 8)


def test_tf_same_padding_is_asymmetric_for_even_inputs() -> None:
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    # TF "same": output ceil(8/2) = 4, total padding 1 -> 0 before, 1 after.
    ref = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.allclose(conv(x), ref)
    conv5 = Conv2dSame(1, 1, 5, stride=1, bias=False)
    assert torch.allclose(conv5(x), F.conv2d(x, conv5.weight, padding=2))
    assert conv(torch.randn(1, 1, 7, 7)).shape[-1] == 4


def test_classifies_real_photographs(model: EfficientNetLite0) -> None:
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not hopper.is_file():
        pytest.skip("matplotlib sample photo not installed")
    with torch.no_grad():
        top5 = model(_photo(hopper)).topk(5).indices[0].tolist()
    assert MILITARY_UNIFORM in top5  # Grace Hopper in uniform (top-3 with academic gown / mortarboard)
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return
    images = Path(spec.origin).parent / "datasets" / "images"
    if (images / "china.jpg").is_file() and (images / "flower.jpg").is_file():
        x = torch.cat([_photo(images / "china.jpg"), _photo(images / "flower.jpg")])
        with torch.no_grad():
            top1 = model(x).argmax(-1).tolist()
        assert top1 == [PALACE, DAISY]


def test_random_init_differs_from_pretrained(model: EfficientNetLite0) -> None:
    fresh = efficientnet_lite0(pretrained=False)
    assert not torch.allclose(fresh._conv_stem.weight, model._conv_stem.weight)
