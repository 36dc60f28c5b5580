"""Image encoders: ViT from a config or a local HF ViT/DeiT folder, EfficientNet-Lite0 tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dusss.config import from_dict
from dusss.errors import CheckpointError, ConfigError
from dusss.models.image_encoders import IMAGENET_MEAN, IMAGENET_STD, ImageEncoderConfig, build_image_encoder

TINY = {"image_size": 32, "patch_size": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2}


def test_vit_random_init_shapes_and_imagenet_normalisation() -> None:
    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(**TINY)).eval()
    x = torch.rand(2, 3, 32, 32)
    out = enc(x)
    assert out.cls.shape == (2, 16) and out.tokens.shape == (2, 4, 16) and out.grid == (2, 2)
    assert enc.out_dim == enc.cls_dim == 16
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = enc.model(pixel_values=(x - mean) / std).last_hidden_state
    assert torch.allclose(out.cls, ref[:, 0]) and torch.allclose(out.tokens, ref[:, 1:])


def test_vit_other_input_size_interpolates_positions() -> None:
    enc = build_image_encoder(ImageEncoderConfig(**TINY)).eval()
    out = enc(torch.rand(1, 3, 64, 48))
    assert out.grid == (4, 3) and out.tokens.shape == (1, 12, 16)


def test_vit_attention_map_on_request() -> None:
    enc = build_image_encoder(ImageEncoderConfig(**TINY)).eval()
    out = enc(torch.rand(2, 3, 32, 32), return_attention=True)
    assert out.cls_attention is not None and out.cls_attention.shape == (2, 4)
    assert bool((out.cls_attention.sum(-1) <= 1.0 + 1e-5).all())


@pytest.mark.parametrize("model_type", ["vit", "deit"])
def test_vit_from_local_folder(tmp_path: Path, model_type: str) -> None:
    from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTModel

    conf_cls, model_cls = (DeiTConfig, DeiTModel) if model_type == "deit" else (ViTConfig, ViTModel)
    conf = conf_cls(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    torch.manual_seed(0)
    src = model_cls(conf, add_pooling_layer=False)
    src.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    enc = build_image_encoder(ImageEncoderConfig(path=str(tmp_path), image_size=32)).eval()
    x = torch.rand(2, 3, 32, 32)
    out = enc(x)
    n_prefix = 2 if model_type == "deit" else 1  # DeiT: [CLS] + distillation token
    assert out.tokens.shape == (2, 4, 16)
    ref = src.eval()(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    assert torch.allclose(out.tokens, ref[:, n_prefix:], atol=1e-5)
    fresh = build_image_encoder(ImageEncoderConfig(path=str(tmp_path), random_init=True))
    w_fresh = fresh.model.embeddings.patch_embeddings.projection.weight
    assert not torch.allclose(w_fresh, src.embeddings.patch_embeddings.projection.weight)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        build_image_encoder(ImageEncoderConfig(path=str(tmp_path)))


@pytest.mark.parametrize("cnn_cls", ["head", "stride16"])
def test_efficientnet_encoder_tokens(cnn_cls: str) -> None:
    enc = build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", cnn_cls=cnn_cls)).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 128, 128))
    assert out.tokens.shape == (2, 64, 112) and out.grid == (8, 8)
    assert out.cls.shape == (2, 1280 if cnn_cls == "head" else 112) and enc.cls_dim == out.cls.shape[1]
    assert enc.out_dim == 112 and out.cls_attention is None
    assert not any(k.startswith("_fc") for k in enc.model.state_dict())


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_efficientnet_batchnorm_momentum_is_the_configured_one(momentum: float) -> None:
    enc = build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", bn_momentum=momentum)).train()
    bn = enc.model._bn0
    before = bn.running_mean.clone()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        enc(x)
        stem = enc.model._conv_stem(enc.model.normalize(x))
    # one train-mode step: running = (1 - m) * running + m * batch mean (the ImageNet statistics fade at rate m)
    expected = (1 - momentum) * before + momentum * stem.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, atol=1e-5, rtol=1e-4)


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        ImageEncoderConfig(bn_momentum=0.0)
    with pytest.raises(ConfigError):
        ImageEncoderConfig(kind="resnet")
    with pytest.raises(ConfigError):
        ImageEncoderConfig(image_size=100, patch_size=16)
    with pytest.raises(ConfigError):
        ImageEncoderConfig(kind="efficientnet_lite0", path="/x")
    with pytest.raises(ConfigError):
        from_dict(ImageEncoderConfig, {"kind": "vit", "bogus": 1})


def _pickle_only(folder: Path) -> None:
    """Turn a saved HF folder's model.safetensors into a (real, pickled) pytorch_model.bin."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()


def test_a_folder_with_only_pickled_weights_is_refused_naming_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import ViTConfig, ViTModel

    conf = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    ViTModel(conf, add_pooling_layer=False).save_pretrained(tmp_path)
    _pickle_only(tmp_path)

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError) as err:
        build_image_encoder(ImageEncoderConfig(path=str(tmp_path), image_size=32))
    assert str(err.value).startswith(f"{tmp_path}: no *.safetensors weights (found only pytorch_model.bin)")
    assert "\n" not in str(err.value)
    # random_init reads the folder's config only: nothing to refuse
    assert build_image_encoder(ImageEncoderConfig(path=str(tmp_path), image_size=32, random_init=True)).out_dim == 16
