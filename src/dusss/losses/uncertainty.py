"""Semantic Similarity Supervision (SSS), DuSSS paper eqs 1-5 (METHOD.md §3.1). Pure tensor functions.

All pairwise functions take row sets [..., B1, D] and [..., B2, D] and return [..., B1, B2].
"""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 1e-4
SIGMA_MAX = 1e2


def sigma_from_logsigma(logsigma: torch.Tensor) -> torch.Tensor:
    """sigma = exp(log sigma), clamped to [1e-4, 1e2] (the PDT predicts log sigma)."""
    return logsigma.clamp(math.log(SIGMA_MIN), math.log(SIGMA_MAX)).exp()


def _pairwise_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 for all pairs, [..., B1, B2], via the expansion (clamped at 0)."""
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1, keepdim=True).transpose(-2, -1)
    return (xx + yy - 2.0 * (x @ y.transpose(-2, -1))).clamp_min(0.0)


def w2_diag(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Eq 1: squared 2-Wasserstein distance between diagonal Gaussians, for all pairs.

    D_2W(i, j) = ||mu1_i - mu2_j||^2 + ||sigma1_i - sigma2_j||^2, with sigma the standard deviations.
    Inputs [..., B1, D] and [..., B2, D]; output [..., B1, B2].
    """
    return _pairwise_sq(mu1, mu2) + _pairwise_sq(sigma1, sigma2)


def uncertainty_level(w2: torch.Tensor, a: float = 1.0 / 200.0, b: float = 4.0) -> torch.Tensor:
    """Eq 2: D_u = a * D_2W + b (a > 0 scale, b shift)."""
    return a * w2 + b


def semantic_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D_s(x_i, y_j) = ||x_i - y_j||_2 for all pairs (non-squared Euclidean between embeddings), [..., B1, B2].

    A 1e-12 under the square root keeps the gradient finite for identical rows.
    """
    return (_pairwise_sq(x, y) + 1e-12).sqrt()


def relative_uncertainty(du: torch.Tensor, ds: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq 3: relative uncertainty D^_u = D_u / (D_s + eps)."""
    return du / (ds + eps)


def sss_weight(du_hat: torch.Tensor, lam: float = 0.2) -> torch.Tensor:
    """Eq 4: D_SSS = exp(-lambda * D^_u), in (0, 1]; lambda = 0 gives 1 everywhere."""
    return torch.exp(-lam * du_hat)


def uncertainty_cosine(cos: torch.Tensor, d_sss: torch.Tensor) -> torch.Tensor:
    """Eq 5: uncertainty cosine similarity sim^ = 1 - (1 - cos) * D_SSS (>= cos since D_SSS <= 1)."""
    return 1.0 - (1.0 - cos) * d_sss


def sss_matrix(
    x: torch.Tensor,
    y: torch.Tensor,
    mu_x: torch.Tensor,
    sigma_x: torch.Tensor,
    mu_y: torch.Tensor,
    sigma_y: torch.Tensor,
    lam: float = 0.2,
    a: float = 1.0 / 200.0,
    b: float = 4.0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs 1-4 end to end for unit embeddings x [B1,d], y [B2,d] and their Gaussians: returns
    (D_SSS [B1,B2], D_2W [B1,B2])."""
    w2 = w2_diag(mu_x, sigma_x, mu_y, sigma_y)
    du = uncertainty_level(w2, a, b)
    ds = semantic_distance(x, y)
    return sss_weight(relative_uncertainty(du, ds, eps), lam), w2


__all__ = [
    "SIGMA_MAX",
    "SIGMA_MIN",
    "relative_uncertainty",
    "semantic_distance",
    "sigma_from_logsigma",
    "sss_matrix",
    "sss_weight",
    "uncertainty_cosine",
    "uncertainty_level",
    "w2_diag",
]
