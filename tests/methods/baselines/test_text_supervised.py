"""`clip` and `lvit`: the text-equipped, fully supervised baselines (their loss, labels and construction)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dusss.errors import ConfigError
from dusss.losses.segmentation import seg_loss
from dusss.methods.segmentation import SEG_METHODS, SegMethodConfig, build_seg_method
from dusss.models.text_encoders import TextEncoderConfig
from dusss.models.text_segmenters import ClipSegmenter, LViTSegmenter
from dusss.models.unet import UNet, UNetConfig
from dusss.models.vlm import VisionLanguageModel

TINY_TEXT = TextEncoderConfig(random_init=True, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                              dropout=0.0)
TEXTS = ["Unilateral pulmonary infection, one infected area, upper left lung.", "No pulmonary infection.",
         "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."]


def _lvit_method() -> tuple:
    cfg = SegMethodConfig()
    cfg.lvit.text = TINY_TEXT
    torch.manual_seed(0)
    student = SEG_METHODS["lvit"].build_student(UNetConfig(base_width=4), cfg)
    with torch.no_grad():
        for film in student.films:
            film.gamma.weight.normal_(0, 0.5)
    return build_seg_method("lvit", cfg, student), student


def test_registered_as_fully_supervised_text_networks() -> None:
    for name, network in (("clip", ClipSegmenter), ("lvit", LViTSegmenter)):
        cls = SEG_METHODS[name]
        assert cls.network == name and not cls.uses_unlabeled
        assert network.needs_text
    assert SEG_METHODS["clip"].needs_vlm and SEG_METHODS["clip"].vlm_pretrain == "clip"
    assert not SEG_METHODS["lvit"].needs_vlm
    assert isinstance(SEG_METHODS["supervised"].build_student(UNetConfig(base_width=4), SegMethodConfig()), UNet)


def test_loss_is_l_sup_of_the_text_conditioned_logits_over_the_masked_images() -> None:
    method, student = _lvit_method()
    method.train()
    x = torch.rand(3, 3, 32, 32)
    y = (torch.rand(3, 1, 32, 32) > 0.8).float()
    has = torch.tensor([True, False, True])
    loss, logs = method.loss({"image": x, "mask": y, "has_mask": has, "text": TEXTS})
    torch.manual_seed(0)
    z = student(x, TEXTS)
    per_image = seg_loss(z, y, "dice_bce", reduction="none")
    expected = (per_image[0] + per_image[2]) / 2  # the image without a mask does not count
    torch.testing.assert_close(loss, expected)
    assert logs["sup"] == pytest.approx(float(expected.detach())) == pytest.approx(logs["loss"])
    # the report is an input: other reports, another loss
    other, _ = method.loss({"image": x, "mask": y, "has_mask": has, "text": TEXTS[::-1]})
    assert abs(float(other.detach()) - float(loss.detach())) > 1e-4
    loss.backward()
    assert student.films[0].gamma.weight.grad is not None


def test_pseudo_labels_are_the_eval_mode_logits_and_need_the_reports() -> None:
    method, student = _lvit_method()
    method.train()
    x = torch.rand(3, 3, 32, 32)
    out = method.pseudo_labels(x, TEXTS)
    assert set(out) == {"student"}
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(out["student"], student(x, TEXTS))
    student.train()
    method.pseudo_labels(x, TEXTS)
    assert student.training  # the mode is restored
    with pytest.raises(ValueError, match="needs one report per image"):
        method.pseudo_labels(x)


def test_clip_needs_a_vlm_and_trains_its_decoder_at_the_runs_lr(tiny_vlm_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a pretrained VLM"):
        SEG_METHODS["clip"].build_student(UNetConfig(base_width=4), SegMethodConfig())
    vlm = VisionLanguageModel.from_checkpoint(tiny_vlm_checkpoint(tmp_path / "vlm.safetensors"))
    cfg = SegMethodConfig(text_mask_lr=0.02)  # the Step-2 text-mask generator's lr: not this network's
    student = SEG_METHODS["clip"].build_student(UNetConfig(base_width=4), cfg, vlm, "v.safetensors")
    method = build_seg_method("clip", cfg, student, vlm)
    groups = method.param_groups(1e-3, 1e-4)
    assert {g["lr"] for g in groups} == {1e-3}
    assert {g["weight_decay"] for g in groups} == {1e-4, 0.0}  # scalars (κ, β) and biases without decay
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in student.parameters() if p.requires_grad}
    assert not any(id(p) in in_groups for p in vlm.parameters())


def test_clip_network_fits_a_small_set(tiny_vlm_checkpoint, tmp_path: Path) -> None:
    """The CLIP-style network learns: 100 AdamW steps on 8 images take it from an empty mask to Dice > 0.9."""
    from dusss.metrics import dice_score

    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_checkpoint(tiny_vlm_checkpoint(tmp_path / "vlm.safetensors"))
    cfg = SegMethodConfig()
    cfg.text_mask.skip_channels = 4
    student = SEG_METHODS["clip"].build_student(UNetConfig(), cfg, vlm, "")
    method = build_seg_method("clip", cfg, student, vlm)
    x = torch.rand(8, 3, 32, 32)
    y = torch.zeros(8, 1, 32, 32)
    y[0::2, :, :, :16] = 1
    y[1::2, :, :, 16:] = 1
    batch = {"image": x, "mask": y, "text": ["Infection in the left lung.", "Infection in the right lung."] * 4}
    before = dice_score(torch.sigmoid(method.pseudo_labels(x, batch["text"])["student"]), y).mean()
    opt = torch.optim.AdamW(method.param_groups(1e-2, 0.0))
    method.train()
    for _ in range(100):
        loss, _ = method.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dice_score(torch.sigmoid(method.pseudo_labels(x, batch["text"])["student"]), y).mean()
    assert before < 0.7 and after > 0.9, (float(before), float(after))
