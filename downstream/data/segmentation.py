"""Prepared CTs with label maps, for the segmentation task.

Training crops of `image_size` are centred on a foreground voxel with probability
`foreground_ratio` (as nnU-Net oversamples foreground); validation/test/predict see whole
volumes (the task slides a window over them). Label values are remapped to classes 1..K; crops
that do not fit are padded with air (-1024 HU) and background.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from downstream.data.errors import TaskDataError
from downstream.data.label_names import LABEL_NAMES_FILE, read_label_names, resolve_classes
from downstream.data.study_crops import TASK_LOADER
from fm3d.data.base import LoaderSettings, StudyDataModule
from fm3d.data.cache import PreparedCache
from fm3d.data.regions import AIR_HU, crop_or_pad


class _SegmentationCrops(Dataset):
    """`samples_per_volume` random crops per study, foreground-biased."""

    def __init__(self, module: SegmentationDataModule, study_ids: list[str]) -> None:
        self.module, self.study_ids = module, study_ids
        self._foreground: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.study_ids) * self.module.samples_per_volume

    def _foreground_voxels(self, study_id: str, label: np.ndarray) -> np.ndarray:
        if study_id not in self._foreground:
            coords = np.argwhere(label > 0)
            # A subsample is enough to pick crop centres from and keeps memory flat for big volumes.
            if len(coords) > 20_000:
                coords = coords[np.random.default_rng(0).choice(len(coords), 20_000, replace=False)]
            self._foreground[study_id] = coords
        return self._foreground[study_id]

    def __getitem__(self, index: int) -> dict[str, Any]:
        module = self.module
        study_id = self.study_ids[index // module.samples_per_volume]
        image, label = module.cache.image(study_id), module.class_map(study_id)
        size = module.image_size
        rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
        foreground = self._foreground_voxels(study_id, label)
        if len(foreground) and rng.random() < module.foreground_ratio:
            centre = foreground[rng.integers(len(foreground))]
            start = tuple(int(c) - n // 2 for c, n in zip(centre, size, strict=True))
        else:
            start = tuple(
                int(rng.integers(min(0, d - n), max(d - n, 0) + 1))
                for d, n in zip(image.shape, size, strict=True)
            )
        return {
            "image": torch.from_numpy(crop_or_pad(image, start, size, AIR_HU).astype(np.float32))[None],
            "label": torch.from_numpy(crop_or_pad(label, start, size, 0).astype(np.int64))[None],
            "study_id": study_id,
        }


class _WholeVolumes(Dataset):
    """Whole prepared volumes (with their remapped label when present) for sliding-window inference."""

    def __init__(self, module: SegmentationDataModule, study_ids: list[str]) -> None:
        self.module, self.study_ids = module, study_ids

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study_id = self.study_ids[index]
        cache = self.module.cache
        sample = {
            "image": torch.from_numpy(np.asarray(cache.image(study_id), dtype=np.float32))[None],
            "study_id": study_id,
            "record": json.dumps(cache.record(study_id)),
        }
        if cache.label(study_id) is not None:
            sample["label"] = torch.from_numpy(self.module.class_map(study_id).astype(np.int64))[None]
        return sample


class SegmentationDataModule(StudyDataModule):
    """Prepared CTs with label maps, for the segmentation task (see the module docstring).

    Label names come from the data (`downstream.data.label_names`): the cache's labels.json, or the
    file `label_names` points to, names each label value; the config picks classes by name or by
    value, and a config whose names disagree with the data's is refused.

    Args:
        label_values: label-map values to segment, in class order (class k + 1 = label_values[k]);
            every other value is background. None: the values of `class_names` in the data's names.
        class_names: one name per class. None: the data's names of `label_values` (of every named
            foreground value when both are None).
        label_names: a labels.json ({"<value>": "<name>"}); None: `<cache>/labels.json` when present.
        image_size: training crop (D, H, W) in voxels; must be divisible by the encoder's patch (the
            task's sliding window has the same size).
        samples_per_volume: crops per study per epoch.
        foreground_ratio: probability that a crop is centred on a foreground voxel.
        loader: batch size (of training crops; whole volumes load one at a time), workers, split
            fractions, seed and fixed splits (`LoaderSettings`).
    """

    predict_split = "test"
    drop_last_train = False

    def __init__(
        self,
        cache_dir: str | Path,
        label_values: list[int] | None = None,
        class_names: list[str] | None = None,
        label_names: str | None = None,
        image_size: tuple[int, int, int] = (64, 64, 64),
        samples_per_volume: int = 4,
        foreground_ratio: float = 0.67,
        loader: LoaderSettings = TASK_LOADER,
    ) -> None:
        super().__init__(cache_dir, loader)
        names_file = Path(label_names) if label_names is not None else self.cache_dir / LABEL_NAMES_FILE
        names = read_label_names(names_file) if label_names is not None or names_file.is_file() else None
        self.label_values, self.class_names = resolve_classes(label_values, class_names, names, names_file)
        self.image_size = tuple(image_size)
        self.samples_per_volume = samples_per_volume
        self.foreground_ratio = foreground_ratio
        lut_size = max(self.label_values) + 1
        self._lut = np.zeros(lut_size, dtype=np.int64)
        self._lut[self.label_values] = np.arange(1, len(self.label_values) + 1)

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        with_label = cache.index.filter(pl.col("label_file").is_not_null())["study_id"].to_list()
        if not with_label:
            raise TaskDataError(cache.root, "no study has a label map", "add label_path to the manifest")
        return with_label

    def class_map(self, study_id: str) -> np.ndarray:
        """The study's label map with `label_values` remapped to 1..K and everything else to 0."""
        label = np.asarray(self.cache.label(study_id)).astype(np.int64)
        out = np.zeros(label.shape, dtype=np.int64)
        inside = (label >= 0) & (label < len(self._lut))
        out[inside] = self._lut[label[inside]]
        return out

    def dataset(self, split: str) -> Dataset:
        """Foreground-biased crops to train on; whole volumes to evaluate (the task slides a window)."""
        if split == "train":
            return _SegmentationCrops(self, self.study_ids(split))
        return _WholeVolumes(self, self.study_ids(split))

    def loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        # Whole volumes differ in shape: an evaluation batch holds one.
        return super().loader(split, batch_size or (None if split == "train" else 1))
