"""LViT U-Net (METHOD §2.7): parameter count, shapes, gradients, channels_last, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from dusss.checkpoint import save_checkpoint
from dusss.errors import CheckpointError, ConfigError
from dusss.models.unet import UNet, UNetConfig


def test_default_parameter_count_matches_paper() -> None:
    model = UNet()
    assert model.cfg == UNetConfig(base_width=64, in_channels=3, n_classes=1)
    assert model.num_parameters() == 14_751_873


def test_inc_is_a_single_conv_and_widths() -> None:
    model = UNet(UNetConfig(base_width=8))
    convs = [m for m in model.inc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].out_channels == 8
    assert model.down4[1][1][0].out_channels == 64  # 8w
    assert model.up4.up.in_channels == model.up4.up.out_channels == 64
    assert model.outc.kernel_size == (1, 1)


@pytest.mark.parametrize("size", [64, 96, 128])
def test_output_shape_is_logits_at_input_size(size: int) -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=8)).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, size, size)
    assert y.dtype == torch.float32
    with torch.no_grad():
        model.outc.bias.fill_(-10.0)  # no sigmoid after outc: the output follows the bias below 0
        assert (model(x) < 0).all()


def test_non_multiple_of_16_is_padded_and_cropped() -> None:
    model = UNet(UNetConfig(base_width=4)).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 50, 70))
    assert y.shape == (1, 1, 50, 70)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=8)).train()
    y = model(torch.rand(2, 3, 32, 32))
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.inc[0].weight.grad.abs().sum() > 0


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=8)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_config_is_range_checked() -> None:
    with pytest.raises(ConfigError):
        UNetConfig(base_width=0)


def test_checkpoint_round_trip_gives_same_predictions(tmp_path) -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=4)).eval()
    tensors, meta = model.to_checkpoint()
    assert meta == {"network": "unet", "unet": {"base_width": 4, "in_channels": 3, "n_classes": 1}}
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tensors, "segmentation", meta)
    loaded = UNet.from_checkpoint(path).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    save_checkpoint(tmp_path / "vlm.safetensors", tensors, "vlm", meta)
    with pytest.raises(CheckpointError):
        UNet.from_checkpoint(tmp_path / "vlm.safetensors")
