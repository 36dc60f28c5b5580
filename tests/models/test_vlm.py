"""VisionLanguageModel: encode contract, momentum EMA arithmetic, temperature, checkpoint round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dusss.checkpoint import save_checkpoint
from dusss.config import from_dict, to_dict
from dusss.errors import CheckpointError
from dusss.models.image_encoders import ImageEncoderConfig
from dusss.models.text_encoders import TextEncoderConfig
from dusss.models.vlm import MOMENTUM_PAIRS, VisionLanguageModel, VLMConfig


def tiny_config(**kw: object) -> VLMConfig:
    return VLMConfig(
        image=ImageEncoderConfig(image_size=32, hidden_size=16, num_layers=1, num_heads=2),
        text=TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32),
        embed_dim=8, head_hidden=16, pdt_heads=2, **kw,  # type: ignore[arg-type]
    )


TEXTS = ["left lung", "right lower lobe opacity", "bilateral infection", ""]


@pytest.fixture(scope="module")
def vlm() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(tiny_config())


def test_encode_contract(vlm: VisionLanguageModel) -> None:
    img = vlm.encode_image(torch.rand(4, 3, 32, 32))
    assert img["global"].shape == (4, 8) and img["local"].shape == (4, 4, 8) and img["grid"] == (2, 2)
    assert torch.allclose(img["global"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(img["local"].norm(dim=-1), torch.ones(4, 4), atol=1e-5)
    txt = vlm.encode_text(TEXTS)
    n = txt["mask"].shape[1]
    assert txt["global"].shape == (4, 8) and txt["local"].shape == (4, n, 8)
    norms = txt["local"].norm(dim=-1)
    assert torch.allclose(norms, txt["mask"], atol=1e-5)  # unit at words, 0 at padding
    mu, ls = vlm.text_gaussians(txt)
    assert mu.shape == ls.shape == (4, n + 1, 8)
    mu, ls = vlm.image_gaussians(img)
    assert mu.shape == (4, 5, 8)


def test_momentum_branch_has_no_gradient_and_frozen_parameters(vlm: VisionLanguageModel) -> None:
    out = vlm.encode_image(torch.rand(2, 3, 32, 32), momentum=True)
    assert not out["global"].requires_grad and not out["local"].requires_grad
    assert not vlm.encode_text(TEXTS, momentum=True)["global"].requires_grad
    for _, mom in MOMENTUM_PAIRS:
        assert all(not p.requires_grad for p in getattr(vlm, mom).parameters())
    online = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert "logit_scale" in online and any(n.startswith("pdt_image.") for n in online)


def test_update_momentum_ema_arithmetic() -> None:
    torch.manual_seed(1)
    model = VisionLanguageModel(tiny_config(momentum=0.9))
    p = model.image_global.fc1.weight
    pm = model.image_global_m.fc1.weight
    with torch.no_grad():
        p.fill_(1.0)
        pm.fill_(3.0)
        model.text_global.bn1.running_mean.fill_(2.0)
        model.text_global_m.bn1.running_mean.fill_(0.0)
        model.text_global.bn1.num_batches_tracked.fill_(7)
    model.update_momentum()
    assert torch.allclose(pm, torch.full_like(pm, 0.9 * 3.0 + 0.1 * 1.0))  # 2.8
    assert torch.allclose(model.text_global_m.bn1.running_mean, torch.full((16,), 0.1 * 2.0))
    assert int(model.text_global_m.bn1.num_batches_tracked) == 7  # integer buffers are copied
    model.update_momentum()
    assert torch.allclose(pm, torch.full_like(pm, 0.9 * 2.8 + 0.1 * 1.0))  # 2.62
    model.reset_momentum()
    assert torch.equal(pm, p)


def test_temperature_is_learnable_log_scale_and_clamped() -> None:
    model = VisionLanguageModel(tiny_config())
    with torch.no_grad():
        assert abs(float(model.temperature()) - 0.07) < 1e-6
        assert abs(float(model.logit_scale) - math.log(1 / 0.07)) < 1e-6
        model.logit_scale.fill_(10.0)
        assert abs(float(model.temperature()) - 0.01) < 1e-9  # tau_min
    assert not VisionLanguageModel(tiny_config(learn_tau=False)).logit_scale.requires_grad


def test_config_round_trip_through_dict() -> None:
    cfg = tiny_config()
    assert from_dict(VLMConfig, to_dict(cfg)) == cfg


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = VisionLanguageModel(tiny_config()).eval()
    with torch.no_grad():
        model.image_encoder_m.model.embeddings.cls_token.add_(1.0)  # momentum differs from online
    tensors, meta = model.to_checkpoint()
    path = tmp_path / "vlm.safetensors"
    save_checkpoint(path, tensors, "vlm", {**meta, "method": "dusss"})
    side = json.loads((tmp_path / "vlm.json").read_text())
    assert side["kind"] == "vlm" and side["vlm_config"]["embed_dim"] == 8
    loaded = VisionLanguageModel.from_checkpoint(path)
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32)
    for momentum in (False, True):
        a = model.encode_image(x, momentum=momentum)["global"]
        b = loaded.encode_image(x, momentum=momentum)["global"]
        assert torch.allclose(a, b, atol=1e-6)
    ta, tb = model.encode_text(TEXTS), loaded.encode_text(TEXTS)
    assert torch.allclose(ta["local"], tb["local"], atol=1e-5)
    # Without momentum weights: the online part loads and the momentum branch restarts as a copy.
    tensors, meta = model.to_checkpoint(include_momentum=False)
    assert not any(k.startswith("image_encoder_m.") for k in tensors)
    save_checkpoint(tmp_path / "online.safetensors", tensors, "vlm", meta)
    online = VisionLanguageModel.from_checkpoint(tmp_path / "online.safetensors")
    assert torch.allclose(online.encode_image(x, momentum=True)["global"], model.encode_image(x)["global"], atol=1e-6)


def test_checkpoint_errors_are_one_line(tmp_path: Path) -> None:
    seg = tmp_path / "seg.safetensors"
    save_checkpoint(seg, {"w": torch.zeros(2)}, "segmentation", {})
    with pytest.raises(CheckpointError, match="'segmentation' checkpoint, expected 'vlm'") as err:
        VisionLanguageModel.from_checkpoint(seg)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        VisionLanguageModel.from_checkpoint(foreign)
    assert "\n" not in str(err.value)
    bare = tmp_path / "bare.safetensors"
    save_checkpoint(bare, {"w": torch.zeros(2)}, "vlm", {})
    with pytest.raises(CheckpointError, match="vlm_config"):
        VisionLanguageModel.from_checkpoint(bare)
    model = VisionLanguageModel(tiny_config())
    tensors, meta = model.to_checkpoint()
    tensors.pop("image_global.fc1.weight")
    save_checkpoint(tmp_path / "broken.safetensors", tensors, "vlm", meta)
    with pytest.raises(CheckpointError, match="missing") as err:
        VisionLanguageModel.from_checkpoint(tmp_path / "broken.safetensors")
    assert "\n" not in str(err.value)


def test_efficientnet_vlm_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(4)
    cfg = tiny_config()
    cfg.image = ImageEncoderConfig(kind="efficientnet_lite0", random_init=True, cnn_cls="stride16")
    model = VisionLanguageModel(cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    out = model.encode_image(x)
    assert out["local"].shape == (2, 16, 8) and out["grid"] == (4, 4)
    tensors, meta = model.to_checkpoint()
    save_checkpoint(tmp_path / "cnn.safetensors", tensors, "vlm", meta)
    loaded = VisionLanguageModel.from_checkpoint(tmp_path / "cnn.safetensors")
    assert torch.allclose(loaded.encode_image(x)["local"], out["local"], atol=1e-6)


@pytest.mark.parametrize("kind", ["efficientnet_lite0", "vit"])
def test_local_only_image_pass_gives_the_same_tokens_and_skips_the_cnn_head(kind: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`with_global=False` (the text-mask generator's pass): identical local tokens, no global; the
    EfficientNet's stride-32 stages and 1280-channel head are not run."""
    torch.manual_seed(5)
    cfg = tiny_config()
    if kind == "efficientnet_lite0":
        cfg.image = ImageEncoderConfig(kind=kind, random_init=True, cnn_cls="head")
    model = VisionLanguageModel(cfg).eval()
    x = torch.rand(2, 3, 64, 64) if kind == "efficientnet_lite0" else torch.rand(2, 3, 32, 32)
    full = model.encode_image(x)
    head_calls = []
    if kind == "efficientnet_lite0":
        conv_head = model.image_encoder.model._conv_head
        monkeypatch.setattr(conv_head, "forward", lambda t: head_calls.append(t.shape) or t)
    local = model.encode_image(x, with_global=False)
    assert local["global"] is None and local["grid"] == full["grid"]
    assert torch.equal(local["local"], full["local"])
    assert head_calls == []
    assert full["global"].shape == (2, 8)
