"""SSS equations 1-5 on hand-derived 2x2 examples, plus brute-force checks of the W2 closed form."""

from __future__ import annotations

import math

import pytest
import torch

from dusss.losses.uncertainty import (
    relative_uncertainty,
    semantic_distance,
    sigma_from_logsigma,
    sss_matrix,
    sss_weight,
    uncertainty_cosine,
    uncertainty_level,
    w2_diag,
)

# Two Gaussians per side in 2-D.
MU1 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
SIG1 = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
MU2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
SIG2 = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
# W2[i,j] = |mu1_i - mu2_j|^2 + |sig1_i - sig2_j|^2:
#   (0,0): |(0,-1)|^2 + |(0,-1)|^2 = 1 + 1 = 2      (0,1): |(-1,-1)|^2 + |(0,0)|^2 = 2 + 0 = 2
#   (1,0): |(1,-1)|^2 + |(1,-1)|^2 = 2 + 2 = 4      (1,1): |(0,-1)|^2 + |(1,0)|^2 = 1 + 1 = 2
W2_HAND = torch.tensor([[2.0, 2.0], [4.0, 2.0]])


def test_w2_hand_values() -> None:
    assert torch.allclose(w2_diag(MU1, SIG1, MU2, SIG2), W2_HAND)


def _bures_w2(m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """General Gaussian W2^2 = |m1-m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2), full matrices via eigh."""

    def sqrtm(a: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(a)
        return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.t()

    r2 = sqrtm(c2)
    return ((m1 - m2) ** 2).sum() + torch.trace(c1 + c2 - 2 * sqrtm(r2 @ c1 @ r2))


def test_w2_closed_form_matches_bures_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    s1 = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1
    s2 = torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.1
    fast = w2_diag(mu1, s1, mu2, s2)
    for i in range(3):
        for j in range(2):
            ref = _bures_w2(mu1[i], torch.diag(s1[i] ** 2), mu2[j], torch.diag(s2[j] ** 2))
            assert abs(float(fast[i, j] - ref)) < 1e-9


def test_w2_one_dimensional_quantile_coupling() -> None:
    # In 1-D the optimal coupling is the quantile coupling: W2^2 = int_0^1 (F1^-1(u) - F2^-1(u))^2 du.
    m1, s1, m2, s2 = 0.3, 0.5, -1.0, 2.0
    u = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    z = torch.special.ndtri(u)
    brute = float(((m1 + s1 * z - (m2 + s2 * z)) ** 2).mean())
    closed = float(w2_diag(torch.tensor([[m1]]), torch.tensor([[s1]]), torch.tensor([[m2]]), torch.tensor([[s2]]))[0, 0])
    assert abs(brute - closed) < 1e-3  # (1.3)^2 + (1.5)^2 = 3.94
    assert abs(closed - 3.94) < 1e-5


def test_sigma_clamp() -> None:
    s = sigma_from_logsigma(torch.tensor([-20.0, 0.0, math.log(3.0), 20.0]))
    assert torch.allclose(s, torch.tensor([1e-4, 1.0, 3.0, 100.0]))


def test_eq2_to_eq5_hand_values() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    cos = x @ y.t()  # [[1, 0.6], [0, 0.8]]
    du = uncertainty_level(W2_HAND, a=1 / 200, b=4.0)  # a*W2 + b
    assert torch.allclose(du, torch.tensor([[4.01, 4.01], [4.02, 4.01]]))
    ds = semantic_distance(x, y)
    # |x0-y0| = 0, |x0-y1| = sqrt(0.16+0.64) = sqrt(0.8), |x1-y0| = sqrt(2), |x1-y1| = sqrt(0.36+0.04) = sqrt(0.4)
    assert torch.allclose(ds, torch.tensor([[0.0, math.sqrt(0.8)], [math.sqrt(2), math.sqrt(0.4)]]), atol=2e-6)
    dhat = relative_uncertainty(du, ds, eps=1e-6)
    # 4.01/0.894427 = 4.483311, 4.02/1.414214 = 2.842567, 4.01/0.632456 = 6.340357
    assert torch.allclose(dhat[0, 1], torch.tensor(4.483311), atol=1e-4)
    assert torch.allclose(dhat[1, 0], torch.tensor(2.842567), atol=1e-4)
    assert torch.allclose(dhat[1, 1], torch.tensor(6.340357), atol=1e-4)
    assert dhat[0, 0] > 1e5  # identical embeddings: D_s ~ 0
    d = sss_weight(dhat, lam=0.2)
    # exp(-0.2 * D^u): exp(-0.896662) = 0.407929, exp(-0.568513) = 0.566367, exp(-1.268071) = 0.281374
    expected_d = torch.tensor([[0.0, 0.407929], [0.566367, 0.281374]])
    assert torch.allclose(d, expected_d, atol=1e-5)
    sim = uncertainty_cosine(cos, d)
    # 1 - (1 - cos) * D: 1 - 0.4*0.407929 = 0.836828, 1 - 1*0.566367 = 0.433633, 1 - 0.2*0.281374 = 0.943725
    assert torch.allclose(sim, torch.tensor([[1.0, 0.836828], [0.433633, 0.943725]]), atol=1e-5)
    d2, w2 = sss_matrix(x, y, MU1, SIG1, MU2, SIG2, lam=0.2, a=1 / 200, b=4.0, eps=1e-6)
    assert torch.allclose(d2, expected_d, atol=1e-5) and torch.allclose(w2, W2_HAND)


def test_lambda_zero_gives_unit_weight_and_plain_cosine() -> None:
    dhat = torch.tensor([[0.0, 3.0], [100.0, 7.0]])
    assert torch.equal(sss_weight(dhat, lam=0.0), torch.ones(2, 2))
    cos = torch.tensor([[0.3, -0.2], [0.9, 1.0]])
    assert torch.allclose(uncertainty_cosine(cos, torch.ones(2, 2)), cos, atol=1e-7)


def test_uncertainty_cosine_is_at_least_cos_and_grows_with_du() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    mu1, mu2 = torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    s1, s2 = torch.rand(5, 3, generator=g) + 0.1, torch.rand(6, 3, generator=g) + 0.1
    d, _ = sss_matrix(x, y, mu1, s1, mu2, s2, lam=0.2)
    cos = x @ y.t()
    assert bool((uncertainty_cosine(cos, d) >= cos - 1e-7).all())
    assert bool(((d > 0) & (d <= 1)).all())
    # Proposition (eq 19): for fixed cos < 1 and D_s, sim^ increases with D_u.
    du = torch.linspace(4.0, 40.0, 10)
    sims = uncertainty_cosine(torch.tensor(0.2), sss_weight(relative_uncertainty(du, torch.tensor(1.0)), 0.2))
    assert bool((sims[1:] > sims[:-1]).all())


# -- killing the surviving mutants of tools/mutation.py (docs/mutation.md) -------------------------------------
def test_paper_defaults_hand_values() -> None:
    # a = 1/200, b = 4, eps = 1e-6, lambda = 0.2 (DuSSS paper)
    assert uncertainty_level(torch.tensor(100.0)).item() == pytest.approx(4.5)
    assert relative_uncertainty(torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx(1e6)
    assert sss_weight(torch.tensor(5.0)).item() == pytest.approx(math.exp(-1.0))
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # D_s = √2
    mu_x, mu_y, sig = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])  # W2 = 4
    d, w2 = sss_matrix(x, y, mu_x, sig, mu_y, sig)
    assert w2.item() == pytest.approx(4.0)
    assert d.item() == pytest.approx(math.exp(-0.2 * (4 / 200 + 4) / (math.sqrt(2) + 1e-6)))
    d, _ = sss_matrix(x, y, mu_x, sig, mu_y, sig, lam=0.5, a=0.25, b=1.0, eps=0.5)  # D_u = 0.25·4 + 1 = 2
    assert d.item() == pytest.approx(math.exp(-0.5 * 2.0 / (math.sqrt(2) + 0.5)))
