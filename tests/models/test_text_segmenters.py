"""The text-conditioned networks of the `clip` and `lvit` baselines, and the one network loader / call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dusss.checkpoint import save_checkpoint
from dusss.errors import CheckpointError
from dusss.models.grounding import TextMaskConfig, TextMaskGenerator
from dusss.models.networks import load_network, needs_text, segment
from dusss.models.text_encoders import TextEncoderConfig
from dusss.models.text_segmenters import ClipSegmenter, LViTSegmenter
from dusss.models.unet import CHECKPOINT_KIND, UNet, UNetConfig, stage_channels
from dusss.models.vlm import VisionLanguageModel

TINY_TEXT = TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                              dropout=0.0)
TEXTS = ["Unilateral pulmonary infection, one infected area, upper left lung.", "No pulmonary infection."]


def _lvit(width: int = 4) -> LViTSegmenter:
    torch.manual_seed(0)
    return LViTSegmenter(UNetConfig(base_width=width), TINY_TEXT).eval()


def _perturb_films(model: LViTSegmenter) -> None:
    with torch.no_grad():
        for film in model.films:
            film.gamma.weight.normal_(0, 0.5)
            film.shift.weight.normal_(0, 0.5)


def test_unet_condition_hook_sees_the_nine_stage_outputs_in_order() -> None:
    seen: list[tuple[int, int, int]] = []

    def hook(k: int, h: torch.Tensor) -> torch.Tensor:
        seen.append((k, h.shape[1], h.shape[-1]))
        return h

    net = UNet(UNetConfig(base_width=4)).eval()
    x = torch.rand(1, 3, 32, 32)
    out = net(x, condition=hook)
    assert [k for k, _, _ in seen] == list(range(9))
    assert tuple(c for _, c, _ in seen) == stage_channels(4) == (4, 8, 16, 32, 32, 16, 8, 4, 4)
    assert [s for _, _, s in seen] == [32, 16, 8, 4, 2, 4, 8, 16, 32]  # strides 1..16 and back
    assert torch.equal(out, net(x))  # the identity hook changes nothing
    doubled = net(x, condition=lambda k, h: 2 * h if k == 8 else h)  # the last map feeds the 1×1 output conv
    w, b = net.outc.weight, net.outc.bias
    torch.testing.assert_close(doubled - b.view(1, -1, 1, 1), 2 * (out - b.view(1, -1, 1, 1)), rtol=1e-5,
                               atol=1e-5)
    assert w.shape[1] == 4


def test_lvit_is_the_plain_unet_at_initialisation_and_then_reads_the_text() -> None:
    model = _lvit()
    x = torch.rand(2, 3, 32, 32)
    plain = UNet(UNetConfig(base_width=4)).eval()
    plain.load_state_dict(model.unet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x, TEXTS), plain(x))  # FiLM is zero-initialised
        _perturb_films(model)
        a = model(x, TEXTS)
        b = model(x, TEXTS[::-1])
        again = model(x, TEXTS)
    assert (a - b).abs().max() > 1e-3  # the report changes the mask
    torch.testing.assert_close(a, again)  # the same report, the same mask (cached embeddings)
    with pytest.raises(ValueError, match="one report per image"):
        model(x, TEXTS[:1])


def test_lvit_text_embedding_is_the_normalised_mean_of_the_word_pieces() -> None:
    model = _lvit()
    emb = model.text_embeddings(TEXTS)
    with torch.no_grad():
        out = model.text_encoder(TEXTS)
    w = out.attention_mask.unsqueeze(-1)
    mean = (out.tokens * w).sum(1) / w.sum(1)
    torch.testing.assert_close(emb, mean / mean.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_lvit_gradients_reach_the_unet_and_films_never_the_frozen_text_encoder() -> None:
    model = _lvit().train()
    _perturb_films(model)
    model(torch.rand(2, 3, 32, 32), TEXTS).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.films.parameters())
    assert model.unet.inc[0].weight.grad is not None
    assert all(not p.requires_grad and p.grad is None for p in model.text_encoder.parameters())
    assert not model.text_encoder.training  # train() keeps the frozen encoder in eval mode


def test_lvit_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _lvit()
    _perturb_films(model)
    tensors, meta = model.to_checkpoint()
    # a random-init text encoder cannot be rebuilt from a file: its weights stay in the state
    assert any(k.startswith("text_encoder.") for k in tensors) and "text_hf_config" in meta
    save_checkpoint(tmp_path / "m.safetensors", tensors, CHECKPOINT_KIND, {**meta, "image_size": 32})
    loaded, read = load_network(tmp_path / "m.safetensors")
    assert isinstance(loaded, LViTSegmenter) and read["network"] == "lvit"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, TEXTS), model(x, TEXTS))


def test_lvit_with_the_packaged_minilm_keeps_its_frozen_weights_out_of_the_state() -> None:
    model = LViTSegmenter(UNetConfig(base_width=4))
    keys = list(model.state_dict())
    assert keys and not any(k.startswith("text_encoder.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"unet", "films"}
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    assert n_text > 20_000_000  # all-MiniLM-L6-v2: the inference network's parameters include it
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # exactly the trained entries: accepted
    with pytest.raises(RuntimeError, match="missing"):
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("films.0.")})


def _tiny_vlm(tiny_vlm_checkpoint, tmp_path: Path) -> Path:
    return tiny_vlm_checkpoint(tmp_path / "vlm.safetensors")


def test_clip_segmenter_is_the_text_mask_generator_without_its_frozen_vlm(tiny_vlm_checkpoint, tmp_path: Path) -> None:
    path = _tiny_vlm(tiny_vlm_checkpoint, tmp_path)
    cfg = TextMaskConfig(skip_channels=4)
    torch.manual_seed(0)
    model = ClipSegmenter(VisionLanguageModel.from_checkpoint(path), cfg, str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = TextMaskGenerator(model.generator.vlm, cfg)
        ref.load_trainable_state_dict(model.generator.trainable_state_dict())
        torch.testing.assert_close(model(x, TEXTS), ref(x, TEXTS, with_tg=False)["logits"])
    assert model(x, TEXTS).shape == (2, 1, 32, 32)
    assert list(model.state_dict()) and not any(k.startswith("generator.vlm.") for k in model.state_dict())
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(not p.requires_grad for p in model.generator.vlm.parameters())
    with torch.no_grad():  # open the zero-initialised branches, as training does
        for g in model.generator.decoder.gates:
            g.fill_(0.5)
        for proj in model.generator.decoder.skips:
            proj.weight.normal_(0, 0.5)
    model.train()
    model(x, TEXTS).square().mean().backward()
    # every trained parameter gets a gradient in every step (DDP without find_unused_parameters)
    assert all(p.grad is not None for p in trained), [n for n, p in model.named_parameters()
                                                      if p.requires_grad and p.grad is None]
    model.eval()

    tensors, meta = model.to_checkpoint()
    assert meta["network"] == "clip" and meta["vlm"] == str(path)
    save_checkpoint(tmp_path / "m.safetensors", tensors, CHECKPOINT_KIND, {**meta, "image_size": 32})
    loaded, _ = load_network(tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, TEXTS), model(x, TEXTS))
    path.unlink()  # the frozen VLM is rebuilt from its file: without it the model cannot load
    with pytest.raises(CheckpointError, match="needs its frozen VLM"):
        load_network(tmp_path / "m.safetensors")


def test_segment_runs_any_network_and_asks_for_the_reports() -> None:
    unet = UNet(UNetConfig(base_width=4)).eval()
    x = torch.rand(2, 3, 32, 32)
    assert not needs_text(unet) and torch.equal(segment(unet, x, None), unet(x))
    assert torch.equal(segment(unet, x, ["ignored", "too"]), unet(x))
    lvit = _lvit()
    assert needs_text(lvit) and needs_text(torch.nn.parallel.DataParallel(lvit))
    torch.testing.assert_close(segment(lvit, x, TEXTS), lvit(x, TEXTS))
    with pytest.raises(ValueError, match="needs one report per image"):
        segment(lvit, x, None)
    with pytest.raises(ValueError, match="got 1 for 2"):
        segment(lvit, x, TEXTS[:1])


def test_old_sidecars_without_a_network_name_load_a_unet(tmp_path: Path) -> None:
    net = UNet(UNetConfig(base_width=4))
    tensors, meta = net.to_checkpoint()
    assert meta.pop("network") == "unet"
    save_checkpoint(tmp_path / "old.safetensors", tensors, CHECKPOINT_KIND, meta)
    loaded, _ = load_network(tmp_path / "old.safetensors")
    assert isinstance(loaded, UNet)
    save_checkpoint(tmp_path / "odd.safetensors", tensors, CHECKPOINT_KIND, {**meta, "network": "vit"})
    with pytest.raises(CheckpointError, match="unknown network 'vit'"):
        load_network(tmp_path / "odd.safetensors")
