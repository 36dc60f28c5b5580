"""Text encoders: the packaged all-MiniLM-L6-v2 offline, local BERT folders, real padding + masks, freezing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dusss.errors import CheckpointError, ConfigError
from dusss.models.text_encoders import HFTextEncoder, TextEncoderConfig, build_text_encoder, model_folder

TINY = {"random_init": True, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32}


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    return build_text_encoder(TextEncoderConfig()).eval()


def test_minilm_loads_offline_with_pretrained_weights(minilm: HFTextEncoder) -> None:
    assert minilm.out_dim == 384 and len(minilm.model.encoder.layer) == 6
    assert minilm.model.pooler is None
    # Sentence-transformers usage (mean pooling over the attention mask): related sentences are closer.
    texts = ["pneumonia in both lungs on the chest x-ray", "bilateral lung infection seen on the radiograph",
             "the cat sat on the mat"]
    enc = minilm.tokenize(texts)
    with torch.no_grad():
        h = minilm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    sims = e @ e.t()
    assert float(sims[0, 1]) > float(sims[0, 2]) + 0.2


def test_outputs_masks_and_padding_invariance(minilm: HFTextEncoder) -> None:
    texts = ["left lung", "bilateral pulmonary infection, two infected areas, upper left and lower right", ""]
    with torch.no_grad():
        out = minilm(texts)
        alone = minilm(["left lung"])
    b, length, d = out.tokens.shape
    assert (b, d) == (3, 384) and out.cls.shape == (3, 384) and out.attention_mask.shape == (3, length)
    # Masks cover the word pieces only: "left lung" = 2 pieces; [CLS] is not in tokens, [SEP]/[PAD] are 0.
    assert out.attention_mask[0].tolist()[:3] == [1.0, 1.0, 0.0] and float(out.attention_mask[0].sum()) == 2
    assert float(out.attention_mask[2].sum()) == 0  # empty report: no words
    # Padding with an attention mask leaves the short text's states unchanged.
    assert torch.allclose(out.cls[0], alone.cls[0], atol=1e-5)
    assert torch.allclose(out.tokens[0, :2], alone.tokens[0, :2], atol=1e-5)


def test_truncation_to_max_length() -> None:
    enc = build_text_encoder(TextEncoderConfig(max_length=8, **TINY))
    out = enc(["word " * 50, "short"])
    assert out.tokens.shape[1] == 7 and float(out.attention_mask[0].sum()) == 6  # [CLS] + 6 words + [SEP]
    enc = build_text_encoder(TextEncoderConfig(max_length=8, padding="max_length", **TINY))
    assert enc(["short"]).tokens.shape[1] == 7


def test_random_init_keeps_architecture_with_fresh_weights(minilm: HFTextEncoder) -> None:
    fresh = build_text_encoder(TextEncoderConfig(random_init=True))
    assert fresh.out_dim == 384
    w0 = minilm.model.embeddings.word_embeddings.weight
    assert not torch.allclose(fresh.model.embeddings.word_embeddings.weight, w0)


def test_layer_truncation_and_freezing(minilm: HFTextEncoder) -> None:
    two = build_text_encoder(TextEncoderConfig(num_layers=2, trainable_layers=1))
    assert len(two.model.encoder.layer) == 2
    assert torch.equal(two.model.encoder.layer[1].output.dense.weight, minilm.model.encoder.layer[1].output.dense.weight)
    trainable = {n for n, p in two.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)


def test_hf_kind_from_local_folder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    src_dir = model_folder(TextEncoderConfig())
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        shutil.copy(src_dir / name, tmp_path / name)
    torch.manual_seed(0)
    conf = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32)
    BertModel(conf).save_pretrained(tmp_path)
    enc = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path))).eval()
    assert enc.out_dim == 16 and len(enc.model.encoder.layer) == 2
    out = enc(["a chest x-ray"], return_attention=True)
    assert out.cls_attention is not None and out.cls_attention.shape == out.attention_mask.shape


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TextEncoderConfig(kind="hf")
    with pytest.raises(ConfigError):
        TextEncoderConfig(hidden_size=32)  # resizing needs random_init
    with pytest.raises(ConfigError):
        TextEncoderConfig(kind="clip")
    with pytest.raises(ConfigError):
        build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path)))


def test_a_folder_with_only_pickled_weights_is_refused_naming_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    src_dir = model_folder(TextEncoderConfig())
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        shutil.copy(src_dir / name, tmp_path / name)
    conf = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32)
    BertModel(conf).save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")  # a real pickle
    (tmp_path / "model.safetensors").unlink()

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError) as err:
        build_text_encoder(TextEncoderConfig(kind="hf", path=str(tmp_path)))
    assert str(err.value).startswith(f"{tmp_path}: no *.safetensors weights (found only pytorch_model.bin)")
    assert "\n" not in str(err.value)
