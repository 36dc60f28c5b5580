"""Test doubles for code that consumes a VLM (the grounding decoder, the Step-2 methods).

`BagOfWordsVLM` has `VisionLanguageModel`'s encode interface (`encode_image`, `encode_text`, `cfg.embed_dim`)
at a few thousand parameters and with no pretrained files: a strided conv patchifier for images and a hashed
bag-of-words embedding for texts. Use it to test a plug-in method or decoder without loading real encoders.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class BagOfWordsVLM(nn.Module):
    """Tiny stand-in VLM. `batchnorm=True` puts a BatchNorm1d on the image global feature, so a test can
    check that a frozen VLM is run in eval mode (its running statistics must not move)."""

    def __init__(self, dim: int = 16, patch: int = 8, vocab: int = 97, batchnorm: bool = False) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(embed_dim=dim)
        self.patchify = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.BatchNorm1d(dim) if batchnorm else nn.Identity()
        self.words = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.vocab = vocab

    def encode_image(self, images: torch.Tensor, momentum: bool = False, with_global: bool = True) -> dict[str, Any]:
        """{"global": [B,d] unit, "local": [B,N,d] unit patch tokens, "grid": (h, w)} (global even when
        `with_global=False`, which the real VLM may skip: its BatchNorm still sees the batch)."""
        x = self.patchify(images)
        h, w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        return {"global": F.normalize(self.norm(tokens.mean(1)), dim=-1), "local": F.normalize(tokens, dim=-1),
                "grid": (h, w)}

    def encode_text(self, texts: list[str], momentum: bool = False) -> dict[str, Any]:
        """{"global": [B,d] unit, "local": [B,1,d], "mask": [B,1]}: the mean of hashed word embeddings."""
        ids = [[zlib.crc32(t.encode()) % self.vocab for t in text.lower().split()] or [0] for text in texts]
        flat = torch.tensor([i for seq in ids for i in seq])
        offsets = torch.tensor([0] + [len(s) for s in ids[:-1]]).cumsum(0)
        g = F.normalize(self.words(flat, offsets), dim=-1)
        return {"global": g, "local": g[:, None], "mask": torch.ones(len(texts), 1, dtype=torch.bool)}


__all__ = ["BagOfWordsVLM"]
