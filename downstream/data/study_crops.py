"""One fixed-size HU crop per study plus the study's targets: the loaders of the classification,
survival, zero-shot and language tasks.

Crops that do not fit are padded with air (-1024 HU).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from downstream.data.splits import CacheDataModule

AIR_HU = -1024.0


def crop_or_pad(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...], fill: float) -> np.ndarray:
    """The box [start, start + size) of a [D, H, W] array, padded with `fill` where it leaves the array."""
    out = np.full(size, fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def centre_start(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    """Start of a `size` box centred in `shape` (negative when the box is larger: padding)."""
    return tuple((dim - n) // 2 for dim, n in zip(shape, size, strict=True))


def study_crop(image: np.ndarray, size: tuple[int, ...], max_shift: float | None) -> torch.Tensor:
    """A float32 [1, *size] HU crop of a prepared study: centred, or shifted by up to `max_shift` of its size.

    The random shift is a cheap training augmentation that keeps the anatomy in view; None
    (evaluation) keeps the crop centred.
    """
    start = centre_start(image.shape, size)
    if max_shift is not None:
        jitter = [int(torch.randint(-int(n * max_shift), int(n * max_shift) + 1, ()).item()) for n in size]
        start = tuple(s + j for s, j in zip(start, jitter, strict=True))
    return torch.from_numpy(crop_or_pad(image, start, size, AIR_HU).astype(np.float32))[None]


class StudyCrops(Dataset):
    """One fixed-size HU crop per study (shifted at random in training, centred otherwise) plus
    whatever the data module's `targets(study_id)` returns (label tensors, report text)."""

    def __init__(self, module: StudyCropDataModule, study_ids: list[str], train: bool) -> None:
        self.module, self.study_ids = module, study_ids
        self.max_shift = module.crop_shift if train else None

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study_id = self.study_ids[index]
        image = study_crop(self.module.cache.image(study_id), self.module.image_size, self.max_shift)
        return {"image": image, "study_id": study_id, **self.module.targets(study_id)}


class StudyCropDataModule(CacheDataModule):
    """Loaders of one crop per study plus the study's `targets` (labels, report) per split.

    Subclasses set `image_size`, define `targets(study_id)`, and may set `crop_shift`: the
    largest random shift of a training crop, as a share of its size.
    """

    crop_shift: ClassVar[float] = 0.25
    image_size: tuple[int, int, int]

    def targets(self, study_id: str) -> dict[str, Any]:
        """The batch entries of one study besides its image and id."""
        raise NotImplementedError

    def _crops(self, split: str) -> StudyCrops:
        return StudyCrops(self, self.study_ids(split), train=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._crops("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._crops("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._crops("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._crops("predict"), shuffle=False)
