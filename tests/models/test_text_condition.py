"""FiLM and the text → spatial prior of the text-mask generator: identity / zero at init, formula, gradients."""

from __future__ import annotations

import pytest
import torch

from dusss.errors import ConfigError
from dusss.models.text_condition import FiLM, TextPrior


def test_film_is_the_identity_at_init_and_applies_the_formula() -> None:
    torch.manual_seed(0)
    film = FiLM(text_dim=5, channels=3)
    h, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    torch.testing.assert_close(film(h, t), h)
    with torch.no_grad():
        film.gamma.weight.normal_()
        film.shift.bias.fill_(0.5)
    gamma = t @ film.gamma.weight.T + film.gamma.bias  # [2,3]
    expected = h * (1 + gamma[:, :, None, None]) + 0.5
    torch.testing.assert_close(film(h, t), expected)
    with pytest.raises(ValueError, match="text embeddings"):
        film(h, t[:1])


def test_film_weights_get_gradient_at_init() -> None:
    torch.manual_seed(0)
    film = FiLM(text_dim=5, channels=3)
    h, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    (film(h, t) * torch.randn(2, 3, 4, 4)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in film.parameters())


def test_text_prior_is_zero_at_init_and_learns() -> None:
    torch.manual_seed(0)
    prior = TextPrior(text_dim=5, grid=4, hidden=7)
    t = torch.randn(3, 5)
    out = prior(t)
    assert out.shape == (3, 1, 4, 4) and torch.equal(out, torch.zeros_like(out))
    out.mul(torch.randn_like(out)).sum().backward()
    last = prior.net[2]
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    with torch.no_grad():
        last.weight.normal_()
    prior.zero_grad()
    prior(t).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prior.parameters())
    assert not torch.allclose(prior(t[:1]), prior(t[1:2]))  # the map depends on the text


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        TextPrior(text_dim=5, grid=0)
    with pytest.raises(ConfigError):
        FiLM(text_dim=0, channels=3)
