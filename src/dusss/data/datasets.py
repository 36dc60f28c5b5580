"""torch Datasets over manifest records: segmentation (Step 2) and image-text pretraining (Step 1).

Decoded and resized arrays are cached in memory on first use (`preload()` fills the cache up front, e.g.
before DataLoader workers fork, so they share it; non-persistent workers otherwise refill their own
copy each epoch). Randomness comes from a per-item generator seeded with (seed, epoch, index), so an
item is the same whatever the worker layout; call `set_epoch(e)` before each epoch (before the
DataLoader iterator is created, so workers see it).

Augmentation policy "text_safe" (default): horizontal flips swap "left"/"right" in the item's text, so
that a report keeps describing its image; no rot90/vertical flips (see `dusss.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dusss.data.manifest import Record
from dusss.data.readers import read_image, read_mask
from dusss.data.text_aug import augment_text, swap_laterality
from dusss.data.transforms import POLICIES, random_geometric, random_intensity, resize_image, resize_mask
from dusss.errors import ConfigError, DataError


def _to_tensor_image(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


class _CachedRecords(Dataset):
    def __init__(
        self, records: Sequence[Record], image_size: int, seed: int, policy: str, masks: bool
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
        if policy not in POLICIES:
            raise ConfigError(f"augmentation policy must be one of {list(POLICIES)}, got {policy!r}")
        self.records = list(records)
        self.image_size = image_size
        self.seed = int(seed)
        self.policy = policy
        self.epoch = 0
        self._masks = masks
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of this epoch."""
        self.epoch = int(epoch)

    def preload(self) -> None:
        """Decode and resize every record now (fills the in-memory cache)."""
        for i in range(len(self.records)):
            self._arrays(i)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        rec = self.records[index]
        image = read_image(rec.image)
        mask = None
        if self._masks and rec.mask is not None:
            mask = read_mask(rec.mask)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    rec.mask,
                    f"mask size {mask.shape[0]}x{mask.shape[1]} differs from the image size "
                    f"{image.shape[0]}x{image.shape[1]}",
                )
            mask = resize_mask(mask, self.image_size)
        entry = (resize_image(image, self.image_size), mask)
        self._cache[index] = entry
        return entry


class SegmentationDataset(_CachedRecords):
    """Items `{image [3,S,S], mask [1,S,S] (zeros when unlabeled), has_mask, text, key}`.

    `augment`: a random paired geometric transform (`policy`), plus intensity jitter when `intensity`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        augment: bool = False,
        seed: int = 0,
        policy: str = "text_safe",
        intensity: bool = False,
        max_rotation: float = 20.0,
    ) -> None:
        super().__init__(records, image_size, seed, policy, masks=True)
        self.augment = augment
        self.intensity = intensity
        self.max_rotation = max_rotation

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image, mask = self._arrays(index)
        has_mask = mask is not None
        if mask is None:
            mask = np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        text = rec.text
        if self.augment:
            rng = self._rng(index)
            image, mask, params = random_geometric(image, mask, rng, self.policy, self.max_rotation)
            if params.hflip:
                text = swap_laterality(text)
            if self.intensity:
                image = random_intensity(image, rng)
        return {
            "image": _to_tensor_image(image),
            "mask": torch.from_numpy(mask.astype(np.float32)[None]),
            "has_mask": has_mask,
            "text": text,
            "key": rec.key,
        }


class PretrainDataset(_CachedRecords):
    """Items `{image: view 1, image_aug: view 2 [3,S,S], text, text_aug, key}` for image-text pretraining.

    View 1 is a random geometric transform of the image, view 2 an independent one plus intensity jitter
    (`intensity`); each text follows its own view's horizontal flip. `text_aug` applies `augment_text` to
    the second text; otherwise `text_aug` is the (flip-adjusted) report itself. `augment=False` gives
    both views as the plain resized image. Every record needs a non-empty text.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        seed: int = 0,
        text_aug: bool = True,
        augment: bool = True,
        policy: str = "text_safe",
        intensity: bool = True,
        max_rotation: float = 20.0,
    ) -> None:
        super().__init__(records, image_size, seed, policy, masks=False)
        for rec in self.records:
            if not rec.text.strip():
                raise DataError(
                    rec.image, f"manifest row {rec.row}: text is empty (pretraining needs a report)"
                )
        self.text_aug = text_aug
        self.augment = augment
        self.intensity = intensity
        self.max_rotation = max_rotation

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image, _ = self._arrays(index)
        view1, view2, text1, text2 = image, image, rec.text, rec.text
        rng = self._rng(index)
        if self.augment:
            view1, _, p1 = random_geometric(image, None, rng, self.policy, self.max_rotation)
            view2, _, p2 = random_geometric(image, None, rng, self.policy, self.max_rotation)
            text1 = swap_laterality(text1) if p1.hflip else text1
            text2 = swap_laterality(text2) if p2.hflip else text2
            if self.intensity:
                view2 = random_intensity(view2, rng)
        if self.text_aug:
            text2 = augment_text(text2, rng)
        return {
            "image": _to_tensor_image(view1),
            "image_aug": _to_tensor_image(view2),
            "text": text1,
            "text_aug": text2,
            "key": rec.key,
        }
