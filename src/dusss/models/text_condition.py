"""Text conditioning of the text-mask generator (ours; the paper's f_g sees the image only).

Reports name lungs and zones ("upper right lung"), but in z_text = κ·cos(v_f, t_f) + β the dense features v_f
do not depend on the text, so the mask follows image appearance and the report only scales it. Two ways to let
the text choose *where* the mask lights up, both zero-initialised so that the generator is unchanged at
initialisation:

* `FiLM`: feature-wise modulation of the decoder features by the text embedding,
  h ← h·(1 + γ(t)) + b(t), γ and b linear in t (Perez et al., 2018);
* `TextPrior`: a coarse spatial logit map from the text, t → MLP → [g × g], bilinearly upsampled and added to
  z_text (an image-independent "where does this report point" prior).
"""

from __future__ import annotations

import torch
from torch import nn

from dusss.config import check


class FiLM(nn.Module):
    """`h [B,C,H,W], t [B,D] -> h·(1 + γ(t)) + b(t)`; γ, b are zero-initialised linear maps (identity at init)."""

    def __init__(self, text_dim: int, channels: int) -> None:
        super().__init__()
        check(text_dim >= 1 and channels >= 1, f"FiLM needs positive sizes, got {text_dim}, {channels}")
        self.gamma = nn.Linear(text_dim, channels)
        self.shift = nn.Linear(text_dim, channels)
        for lin in (self.gamma, self.shift):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != h.shape[0]:
            raise ValueError(f"FiLM: {t.shape[0]} text embeddings for {h.shape[0]} feature maps")
        t = t.to(h.dtype)
        return h * (1 + self.gamma(t)[:, :, None, None]) + self.shift(t)[:, :, None, None]


class TextPrior(nn.Module):
    """`t [B,D] -> [B,1,grid,grid]` logit map: Linear-ReLU-Linear, the last layer zero-initialised (0 at init)."""

    def __init__(self, text_dim: int, grid: int = 8, hidden: int = 64) -> None:
        super().__init__()
        check(grid >= 1, f"text prior grid must be >= 1, got {grid}")
        check(hidden >= 1, f"text prior hidden width must be >= 1, got {hidden}")
        self.grid = grid
        self.net = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(), nn.Linear(hidden, grid * grid))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t).view(t.shape[0], 1, self.grid, self.grid)
