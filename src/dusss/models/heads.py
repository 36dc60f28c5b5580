"""Projection heads (MGCA style) and the probability distribution transformer (PDT, METHOD.md §2.3).

* `GlobalHead`: Linear -> BN -> ReLU -> Linear -> BN(affine=False), on one vector per sample.
* `LocalHead`: the same per token. Its BatchNorms are computed over the *valid* tokens only (padding is
  gathered out before the MLP and written back as zeros), so padded word positions never enter the batch
  statistics. MGCA's Conv1d version normalises over padding as well; this is the documented difference.
* `norm="layer"` swaps both BatchNorms for LayerNorms (the last without affine): no running statistics, so
  eval() equals train() behaviour even after a few fast-moving steps (an option; BN is the MGCA default).
* `PDT`: token transformer that maps embeddings x [B,N,D] to a diagonal Gaussian per token, (mu, log sigma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d that falls back to running statistics when a training batch has a single row."""
    if not isinstance(bn, nn.BatchNorm1d):
        return bn(x)
    if bn.training and x.shape[0] < 2:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class GlobalHead(nn.Module):
    """MGCA GlobalEmbedding: Linear(in,hidden) -> BN -> ReLU -> Linear(hidden,out) -> BN(affine=False).

    `norm="layer"` uses LayerNorm in both places instead (last one without affine)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 2048, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "layer"):
            raise ValueError(f"head norm must be 'batch' or 'layer', got {norm!r}")
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.bn1: nn.Module
        self.bn2: nn.Module
        if norm == "batch":
            self.bn1 = nn.BatchNorm1d(hidden_dim)
            self.bn2 = nn.BatchNorm1d(out_dim, affine=False)
        else:
            self.bn1 = nn.LayerNorm(hidden_dim)
            self.bn2 = nn.LayerNorm(out_dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,in] -> [B,out] (not normalised)."""
        h = F.relu(_batch_norm(self.bn1, self.fc1(x)))
        return _batch_norm(self.bn2, self.fc2(h))


class LocalHead(GlobalHead):
    """MGCA LocalEmbedding on tokens [B,N,in] with an optional validity mask [B,N]; padded outputs are 0."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        if mask is None:
            return super().forward(x.reshape(b * n, -1)).reshape(b, n, -1)
        valid = mask.reshape(b * n).bool()
        flat = x.reshape(b * n, -1)
        if not bool(valid.any()):
            return flat.new_zeros(b * n, self.fc2.out_features).reshape(b, n, -1)
        vals = super().forward(flat[valid])  # bf16 under autocast: the zeros take its dtype
        out = vals.new_zeros(b * n, vals.shape[-1]).index_put((valid.nonzero(as_tuple=True)[0],), vals)
        return out.reshape(b, n, -1)


class PDT(nn.Module):
    """Probability distribution transformer (METHOD.md §2.3): x [B,N,D] -> (mu, log sigma), each [B,N,D].

    1. x' = LN(GELU(Linear(x)));  2. c = MHSA(x') (H heads, no qkv bias, no output projection, masked keys);
    3. mu_a = Drop(Linear(c[..., :D/2])), ls_a = Drop(Linear(c[..., D/2:]))   (heads 0..H/2-1 vs H/2..H-1);
    4. mu = x + mu_a; mu = mu + MLP(LN(mu));   5. log sigma = ls_a + MLP(LN(ls_a))  (no residual from x).
    Linear weights N(0, 0.02), biases 0, LayerNorm (1, 0).
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 attn_dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads or dim % 2 or num_heads % 2:
            raise ValueError(f"PDT: dim {dim} must be divisible by an even num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        hidden = round(dim * mlp_ratio)
        self.pre = nn.Linear(dim, dim)
        self.pre_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.mu_proj = nn.Linear(dim // 2, dim)
        self.logsig_proj = nn.Linear(dim // 2, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.norm_mu = nn.LayerNorm(dim)
        self.norm_sig = nn.LayerNorm(dim)
        self.mlp_mu = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                    nn.Dropout(dropout))
        self.mlp_sig = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                     nn.Dropout(dropout))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,N,D]; mask [B,N] (1 = valid key) -> (mu [B,N,D], logsigma [B,N,D])."""
        b, n, d = x.shape
        h = self.pre_norm(F.gelu(self.pre(x)))
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = self.attn_drop(scores.softmax(dim=-1))
        c = (attn @ v).transpose(1, 2).reshape(b, n, d)
        mu_a = self.proj_drop(self.mu_proj(c[..., : d // 2]))
        ls_a = self.proj_drop(self.logsig_proj(c[..., d // 2:]))
        mu = x + mu_a
        mu = mu + self.mlp_mu(self.norm_mu(mu))
        logsigma = ls_a + self.mlp_sig(self.norm_sig(ls_a))
        return mu, logsigma


__all__ = ["PDT", "GlobalHead", "LocalHead"]
