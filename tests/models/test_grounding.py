"""Grounding decoder f_g and the text-mask generator (eqs 10-12) with a small fake VLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dusss.models import grounding
from dusss.models.grounding import GroundingDecoder, TextMaskConfig, TextMaskGenerator
from dusss.testing import BagOfWordsVLM

TEXTS = ["left lung opacity", "bilateral lower lobe infection", "right upper zone lesion", "no finding"]


def _generator(**cfg) -> TextMaskGenerator:
    torch.manual_seed(0)
    return TextMaskGenerator(BagOfWordsVLM(batchnorm=True), TextMaskConfig(**cfg))


def test_decoder_is_nearest_upsampling_at_init() -> None:
    dec = GroundingDecoder(dim=6, n_layers=2)
    x = torch.randn(2, 6, 3, 5)
    out = dec(x)
    assert out.shape == (2, 6, 12, 20)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=4, mode="nearest"))
    assert all(g.item() == 0.0 for g in dec.gates)
    with torch.no_grad():
        dec.gates[0].fill_(0.5)
    assert not torch.allclose(dec(x), F.interpolate(x, scale_factor=4, mode="nearest"))


def test_decoder_layer_formula() -> None:
    torch.manual_seed(0)
    dec = GroundingDecoder(dim=3, n_layers=1)
    with torch.no_grad():
        dec.gates[0].fill_(0.3)
    x = torch.randn(1, 3, 2, 2)
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    expected = up + torch.tanh(torch.tensor(0.3)) * dec.convs[0](F.relu(up))
    torch.testing.assert_close(dec(x), expected)


def test_vlm_is_frozen_and_stays_in_eval() -> None:
    gen = _generator()
    vlm = gen.vlm
    assert all(not p.requires_grad for p in vlm.parameters())
    gen.train()
    assert gen.training and gen.decoder.training and not vlm.training
    before = vlm.norm.running_mean.clone()
    out = gen(torch.rand(4, 3, 32, 32), TEXTS)
    assert torch.equal(vlm.norm.running_mean, before)
    out["loss_tg"].backward()
    assert all(p.grad is None for p in vlm.parameters())
    names = {id(p) for p in gen.trainable_parameters()}
    assert not any(id(p) in names for p in vlm.parameters())
    assert len(gen.trainable_parameters()) == 2 * 3 + 5  # 2 layers × (conv w, conv b, gate) + 5 scalars


def test_trainable_parameters_are_decoder_and_scalars() -> None:
    gen = _generator()
    expected = set(dict(gen.decoder.named_parameters()).values()) | {
        gen.kappa,
        gen.beta,
        gen.pool_kappa,
        gen.pool_beta,
        gen.logit_scale,
    }
    assert set(gen.trainable_parameters()) == expected
    fixed = _generator(learnable=False)
    assert set(fixed.trainable_parameters()) == set(fixed.decoder.parameters()) | {fixed.logit_scale}


def test_forward_shapes_and_logits_formula() -> None:
    gen = _generator()
    images = torch.rand(4, 3, 32, 32)
    out = gen(images, TEXTS)
    assert out["logits"].shape == (4, 1, 32, 32)
    assert out["cos"].shape == (4, 1, 16, 16)  # 4×4 grid, two ×2 layers
    assert out["loss_tg"].ndim == 0 and torch.isfinite(out["loss_tg"])
    v, t = gen.encode(images, TEXTS)
    cos = (v * t[:, :, None, None]).sum(1, keepdim=True)  # own text: image b with text b
    torch.testing.assert_close(out["cos"], cos)
    expected = F.interpolate(10.0 * cos - 2.5, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["logits"], expected)
    assert out["logits"].min() >= -12.5 - 1e-4 and out["logits"].max() <= 7.5 + 1e-4


def test_each_image_uses_its_own_text() -> None:
    gen = _generator()
    images = torch.rand(4, 3, 32, 32)
    base = gen(images, TEXTS)["logits"]
    perm = [2, 0, 3, 1]
    permuted = gen(images[perm], [TEXTS[i] for i in perm])["logits"]
    torch.testing.assert_close(permuted, base[perm])
    # changing image 1's text changes only image 1's mask (no averaging over the batch's texts)
    changed = gen(images, [TEXTS[0], "something else entirely", TEXTS[2], TEXTS[3]])["logits"]
    torch.testing.assert_close(changed[[0, 2, 3]], base[[0, 2, 3]])
    assert not torch.allclose(changed[1], base[1])
    # single-image calls agree with the batched diagonal
    for b in range(4):
        torch.testing.assert_close(gen.text_logits(images[b : b + 1], [TEXTS[b]]), base[b : b + 1])


def test_mean_pairing_repro_averages_over_texts() -> None:
    gen = _generator(pairing="mean")
    images = torch.rand(4, 3, 32, 32)
    base = gen(images, TEXTS)["logits"]
    changed = gen(images, [TEXTS[0], "something else entirely", TEXTS[2], TEXTS[3]])["logits"]
    assert not torch.allclose(changed[0], base[0])


def test_text_logits_one_image_many_prompts() -> None:
    gen = _generator()
    image = torch.rand(1, 3, 32, 32)
    maps = gen.text_logits(image, TEXTS)
    assert maps.shape == (4, 1, 32, 32)
    for n, text in enumerate(TEXTS):
        torch.testing.assert_close(maps[n : n + 1], gen(image, [text], with_tg=False)["logits"])
    with pytest.raises(ValueError):
        gen.text_logits(torch.rand(2, 3, 32, 32), TEXTS)


def test_loss_tg_pools_with_sigmoid_masks_and_trains_decoder_only(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _generator()
    captured = {}
    real = grounding._tg_loss

    def spy(pooled: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        captured.update(pooled=pooled, text=text, scale=scale)
        return real(pooled, text, scale)

    monkeypatch.setattr(grounding, "_tg_loss", spy)
    images = torch.rand(4, 3, 32, 32)
    out = gen(images, TEXTS)
    assert captured["pooled"].shape == (4, 4, 16)
    assert captured["scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    v, t = gen.encode(images, TEXTS)
    b, n = 1, 3
    m = torch.sigmoid(10.0 * (v[b] * t[n][:, None, None]).sum(0) - 2.5)  # M_bn
    pooled = (m[None] * v[b]).sum((1, 2)) / (m.sum() + 1e-6)
    torch.testing.assert_close(captured["pooled"][b, n], F.normalize(pooled, dim=0))
    out["loss_tg"].backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gen.decoder.gates)
    assert gen.pool_kappa.grad.abs() > 0 and gen.pool_beta.grad.abs() > 0 and gen.logit_scale.grad.abs() > 0
    assert gen.kappa.grad is None and gen.beta.grad is None  # κ, β only shape z_text


def test_tg_scale_is_clamped() -> None:
    gen = _generator()
    with torch.no_grad():
        gen.logit_scale.fill_(10.0)
    assert gen.tg_scale().item() == pytest.approx(100.0)


def test_trainable_state_round_trip() -> None:
    gen = _generator()
    with torch.no_grad():
        gen.decoder.gates[1].fill_(0.7)
        gen.kappa.fill_(3.0)
    state = gen.trainable_state_dict()
    assert not any(k.startswith("vlm.") for k in state)
    other = TextMaskGenerator(gen.vlm, TextMaskConfig())
    other.load_trainable_state_dict(state)
    assert other.decoder.gates[1].item() == pytest.approx(0.7) and other.kappa.item() == 3.0
    with pytest.raises(KeyError):
        other.load_trainable_state_dict({"kappa": torch.tensor(1.0)})


def test_skip_decoder_equals_plain_decoder_at_init_and_learns_from_the_image() -> None:
    torch.manual_seed(0)
    plain = GroundingDecoder(dim=6, n_layers=2)
    skip = GroundingDecoder(dim=6, n_layers=2, skip_channels=4)
    skip.load_state_dict(plain.state_dict(), strict=False)  # same convs and gates; projections are zero
    x, image = torch.randn(2, 6, 3, 5), torch.rand(2, 3, 24, 40)
    torch.testing.assert_close(skip(x, image), plain(x))
    assert len(skip.skips) == 3  # the grid and both upsampled resolutions
    with pytest.raises(ValueError, match="pass the image"):
        skip(x)
    skip(x, image).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in skip.skips.parameters())
    # a non-zero projection makes the output depend on the image
    with torch.no_grad():
        skip.skips[2].weight.fill_(0.1)
    assert not torch.allclose(skip(x, image), skip(x, image.flip(-1)))


def test_skip_features_add_pooled_stem_features_through_the_projection() -> None:
    torch.manual_seed(0)
    dec = GroundingDecoder(dim=2, n_layers=0, skip_channels=3)
    with torch.no_grad():
        dec.skips[0].weight.normal_()
        dec.skips[0].bias.normal_()
    x, image = torch.randn(1, 2, 2, 2), torch.rand(1, 3, 8, 8)
    feats = dec.stem(grounding.with_coordinates(image))
    pooled = feats.reshape(1, 3, 2, 4, 2, 4).mean(dim=(3, 5))  # 4x4 average pooling by hand
    torch.testing.assert_close(dec(x, image), x + dec.skips[0](pooled))


def test_each_distinct_text_is_encoded_once_and_the_cache_matches_the_vlm() -> None:
    gen = _generator()
    calls: list[list[str]] = []
    encode = gen.vlm.encode_text

    def counting(texts, momentum=False):  # type: ignore[no-untyped-def]
        calls.append(list(texts))
        return encode(texts, momentum)

    gen.vlm.encode_text = counting  # type: ignore[method-assign]
    images = torch.rand(4, 3, 32, 32)
    gen(images, [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[1]])
    gen(images, [TEXTS[1], TEXTS[2], TEXTS[2], TEXTS[0]])
    assert calls == [[TEXTS[0], TEXTS[1]], [TEXTS[2]]]
    direct = F.normalize(encode(TEXTS[:3])["global"].float(), dim=-1)
    torch.testing.assert_close(gen.text_embeddings(TEXTS[:3]), direct)
    gen.to("cpu")  # moving the generator clears the cache
    gen(images, TEXTS)
    assert calls[-1] == TEXTS


def test_with_coordinates_appends_row_and_column_in_minus_one_to_one() -> None:
    out = grounding.with_coordinates(torch.zeros(2, 3, 3, 5))
    assert out.shape == (2, 5, 3, 5)
    torch.testing.assert_close(out[1, 3, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(out[0, 4, 2], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))


def _conditioned_pair(condition: str) -> tuple[TextMaskGenerator, TextMaskGenerator]:
    """(unconditioned, conditioned) generators over one VLM with the same decoder weights."""
    torch.manual_seed(0)
    vlm = BagOfWordsVLM()
    plain = TextMaskGenerator(vlm, TextMaskConfig(skip_channels=4))
    cond = TextMaskGenerator(vlm, TextMaskConfig(skip_channels=4, text_condition=condition, prior_grid=4))
    cond.load_state_dict(plain.state_dict(), strict=False)  # the new parts keep their zero init
    with torch.no_grad():  # skip projections away from 0, so that the image features matter
        for proj in (plain.decoder.skips, cond.decoder.skips):
            for p in proj.parameters():
                p.copy_(torch.full_like(p, 0.05))
    return plain, cond


@pytest.mark.parametrize("condition", ["film", "prior"])
def test_text_conditioned_generator_equals_the_unconditioned_one_at_init(condition: str) -> None:
    plain, cond = _conditioned_pair(condition)
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(cond(images, TEXTS)["logits"], plain(images, TEXTS)["logits"])
    torch.testing.assert_close(cond.text_logits(images[:1], TEXTS), plain.text_logits(images[:1], TEXTS))
    names = {n for n, _ in cond.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names and all(n.startswith(("decoder.films.", "prior.")) for n in names)
    new = [p for n, p in cond.named_parameters() if n in names]
    assert {id(p) for p in new} <= {id(p) for p in cond.trainable_parameters()}


def test_film_gets_gradient_and_then_steers_the_mask_by_the_text() -> None:
    _, gen = _conditioned_pair("film")
    images = torch.rand(4, 3, 32, 32)
    gen(images, TEXTS, with_tg=False)["logits"].mul(torch.randn(4, 1, 32, 32)).sum().backward()
    films = list(gen.decoder.films.parameters())
    assert len(gen.decoder.films) == 3 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in films)
    with torch.no_grad():
        for p in films:
            p.normal_(0, 0.3)
    # one image under many prompts = each prompt's own conditioned pass; the prompts now give different maps
    maps = gen.text_logits(images[:1], TEXTS)
    for n, text in enumerate(TEXTS):
        torch.testing.assert_close(maps[n : n + 1], gen(images[:1], [text], with_tg=False)["logits"])
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="FiLM pairs"):
        gen.encode(images[:2], TEXTS)
    with pytest.raises(ValueError, match="pass the text"):
        gen.decoder(torch.randn(1, 16, 4, 4), images[:1])


def test_prior_adds_the_upsampled_text_map_to_the_logits() -> None:
    plain, gen = _conditioned_pair("prior")
    images = torch.rand(2, 3, 32, 32)
    gen(images, TEXTS[:2], with_tg=False)["logits"].mul(torch.randn(2, 1, 32, 32)).sum().backward()
    assert gen.prior.net[2].weight.grad.abs().sum() > 0
    with torch.no_grad():
        gen.prior.net[2].bias.copy_(torch.arange(16.0))
    t = gen.text_embeddings(TEXTS[:2])
    expected = plain(images, TEXTS[:2])["logits"] + F.interpolate(
        gen.prior(t), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(gen(images, TEXTS[:2])["logits"], expected)


@pytest.mark.parametrize("condition", ["film", "prior"])
def test_conditioned_state_round_trips_and_a_state_without_it_is_refused_clearly(condition: str) -> None:
    plain, gen = _conditioned_pair(condition)
    with torch.no_grad():
        for p in gen.parameters():
            if p.requires_grad:
                p.add_(0.1)
    other = TextMaskGenerator(gen.vlm, gen.cfg)
    other.load_trainable_state_dict(gen.trainable_state_dict())
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(other(images, TEXTS[:2])["logits"], gen(images, TEXTS[:2])["logits"])
    with pytest.raises(KeyError, match="text_condition"):
        other.load_trainable_state_dict(plain.trainable_state_dict())  # an old (unconditioned) checkpoint
    with pytest.raises(KeyError, match="text_condition"):
        plain.load_trainable_state_dict(gen.trainable_state_dict())


def test_text_condition_config_is_checked() -> None:
    from dusss.errors import ConfigError

    with pytest.raises(ConfigError):
        TextMaskConfig(text_condition="spatial")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pairing"):
        TextMaskConfig(text_condition="film", pairing="mean")
