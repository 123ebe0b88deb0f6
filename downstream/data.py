"""Task data wiring on top of fm3d's prepared cache: splits, crops and per-study label tables.

Every data module reads a `fm3d prepare` cache (`fm3d.data.cache.PreparedCache`) and splits it
by patient (`fm3d.data.split.split_studies`), or by `fixed_splits` when given. Images come out
as float HU `[B, 1, D, H, W]`: the task scales them with its encoder's HU window
(`DownstreamTask.prepare_image`), so data and encoder can never disagree about it.

- `SegmentationDataModule`: training crops of `roi_size` (centred on a foreground voxel with
  probability `foreground_ratio`, as nnU-Net oversamples foreground), whole volumes for
  validation/test/predict (the task slides a window over them); label values are remapped to
  classes 1..K.
- `ClassificationDataModule`: a per-study table of binary columns (e.g. the demo cohort's
  `findings.parquet`), batch key `labels` [B, K] float and `label_mask` [B, K] bool.
- `SurvivalDataModule`: `ehr labels` output (`tte_time`, `tte_event` list columns, `has_ehr`),
  batch keys as in the batch contract.
Crops that do not fit are padded with air (-1024 HU) and background.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from downstream.label_names import LABEL_NAMES_FILE, read_label_names, resolve_classes
from ehr.errors import TaskSpecError
from ehr.labels import read_label_description
from fm3d.data.cache import PreparedCache
from fm3d.data.split import SPLITS, split_studies
from fm3d.errors import Fm3dError

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class TaskDataError(Fm3dError, ValueError):
    """A label table or split that does not fit the prepared cache (names the file and the fix)."""


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


class CacheDataModule(L.LightningDataModule):
    """Shared split logic: a prepared cache, split by patient or by `fixed_splits`.

    Args:
        cache: folder written by `fm3d prepare`.
        split_fractions: (train, val, test) patient fractions.
        seed: split seed.
        fixed_splits: split name ("train", "val", "test", "predict") -> study ids; overrides the
            patient split for the names it lists (e.g. a one-study smoke run that trains and tests
            on the same study).
        batch_size, num_workers: DataLoader settings (evaluation uses batch size 1 for whole volumes).
    """

    def __init__(
        self,
        cache: str,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        fixed_splits: dict[str, list[str]] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.cache_root = cache
        self.split_fractions = tuple(split_fractions)
        self.seed = seed
        self.fixed_splits = fixed_splits or {}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache: PreparedCache | None = None
        self.splits: dict[str, list[str]] = {}

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        """Studies this task can use (all, by default)."""
        return list(cache.study_ids)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = PreparedCache(self.cache_root)
            eligible = set(self.eligible_studies(self.cache))
            index = self.cache.index.filter(pl.col("study_id").is_in(sorted(eligible)))
            table = split_studies(index.select("study_id", "patient_id"), self.split_fractions, self.seed)
            self.splits = {s: table.filter(pl.col("split") == s)["study_id"].to_list() for s in SPLITS}
            self.splits["predict"] = self.splits["test"]
            for name, ids in self.fixed_splits.items():
                unknown = sorted(set(ids) - eligible)
                if unknown:
                    raise TaskDataError(
                        f"fixed_splits[{name!r}] names studies {unknown[:5]} that are not usable in "
                        f"{self.cache_root}"
                    )
                self.splits[name] = list(ids)
            logger.info("splits: %s", {k: len(v) for k, v in self.splits.items()})

    def study_ids(self, split: str) -> list[str]:
        """The studies of a split; an empty split is an error that says how to fix it."""
        ids = self.splits.get(split, [])
        if not ids:
            sizes = {k: len(v) for k, v in self.splits.items()}
            raise TaskDataError(
                f"the {split!r} split of {self.cache_root} is empty (split sizes {sizes}); "
                "use more studies, other split_fractions/seed, or fixed_splits"
            )
        return ids

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep everything else (study ids, records) as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ---- segmentation ------------------------------------------------------------------------


class _SegmentationCrops(Dataset):
    """`samples_per_volume` random ROI crops per study, foreground-biased."""

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
        size = tuple(module.roi_size)
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


class SegmentationDataModule(CacheDataModule):
    """Prepared CTs with label maps, for the segmentation task (see the module docstring).

    Label names come from the data (`downstream.label_names`): the cache's labels.json, or the
    file `label_names` points to, names each label value; the config picks classes by name or by
    value, and a config whose names disagree with the data's is refused.

    Args:
        label_values: label-map values to segment, in class order (class k + 1 = label_values[k]);
            every other value is background. None: the values of `class_names` in the data's names.
        class_names: one name per class. None: the data's names of `label_values` (of every named
            foreground value when both are None).
        label_names: a labels.json ({"<value>": "<name>"}); None: `<cache>/labels.json` when present.
        roi_size: training crop (D, H, W) in voxels; must be divisible by the encoder's patch.
        samples_per_volume: crops per study per epoch.
        foreground_ratio: probability that a crop is centred on a foreground voxel.
    """

    def __init__(
        self,
        cache: str,
        label_values: list[int] | None = None,
        class_names: list[str] | None = None,
        label_names: str | None = None,
        roi_size: tuple[int, int, int] = (64, 64, 64),
        samples_per_volume: int = 4,
        foreground_ratio: float = 0.67,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        fixed_splits: dict[str, list[str]] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(cache, split_fractions, seed, fixed_splits, batch_size, num_workers)
        names_file = Path(label_names) if label_names is not None else Path(cache) / LABEL_NAMES_FILE
        names = read_label_names(names_file) if label_names is not None or names_file.is_file() else None
        self.label_values, self.class_names = resolve_classes(label_values, class_names, names, names_file)
        self.roi_size = tuple(roi_size)
        self.samples_per_volume = samples_per_volume
        self.foreground_ratio = foreground_ratio
        lut_size = max(self.label_values) + 1
        self._lut = np.zeros(lut_size, dtype=np.int64)
        self._lut[self.label_values] = np.arange(1, len(self.label_values) + 1)

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        with_label = cache.index.filter(pl.col("label_file").is_not_null())["study_id"].to_list()
        if not with_label:
            raise TaskDataError(f"no study in {cache.root} has a label map; add label_path to the manifest")
        return with_label

    def class_map(self, study_id: str) -> np.ndarray:
        """The study's label map with `label_values` remapped to 1..K and everything else to 0."""
        label = np.asarray(self.cache.label(study_id)).astype(np.int64)
        out = np.zeros(label.shape, dtype=np.int64)
        inside = (label >= 0) & (label < len(self._lut))
        out[inside] = self._lut[label[inside]]
        return out

    def train_dataloader(self) -> DataLoader:
        return self._loader(_SegmentationCrops(self, self.study_ids("train")), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(_WholeVolumes(self, self.study_ids("val")), shuffle=False, batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(_WholeVolumes(self, self.study_ids("test")), shuffle=False, batch_size=1)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(_WholeVolumes(self, self.study_ids("predict")), shuffle=False, batch_size=1)


# ---- per-study label tables (classification, survival) -----------------------------------


def read_table(path: str | Path) -> pl.DataFrame:
    """A per-study label table from parquet or CSV, with a `study_id` column."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"label table {path} does not exist")
    table = pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path)
    if "study_id" not in table.columns:
        raise TaskDataError(f"label table {path} has no study_id column (columns: {table.columns})")
    return table.with_columns(pl.col("study_id").cast(pl.String))


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


class StudyTableDataModule(StudyCropDataModule):
    """Prepared CTs joined by study_id to a per-study label table; subclasses say which columns."""

    def __init__(
        self,
        cache: str,
        labels: str,
        image_size: tuple[int, int, int] = (64, 64, 64),
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        fixed_splits: dict[str, list[str]] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(cache, split_fractions, seed, fixed_splits, batch_size, num_workers)
        self.labels_path = labels
        self.image_size = tuple(image_size)
        self.table = read_table(labels)
        self._rows = {row["study_id"]: row for row in self.table.iter_rows(named=True)}

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        joined = [s for s in cache.study_ids if s in self._rows]
        if not joined:
            raise TaskDataError(
                f"no study of {cache.root} appears in {self.labels_path}; the study_id values must match"
            )
        missing = len(cache.study_ids) - len(joined)
        if missing:
            logger.warning(
                "%d studies of %s have no row in %s and are left out", missing, cache.root, self.labels_path
            )
        return joined


class ClassificationDataModule(StudyTableDataModule):
    """Multi-label targets from binary columns (`label_columns`; None = every boolean column).

    Null cells are unknown labels: `label_mask` is False there and the loss ignores them.
    """

    def __init__(
        self,
        cache: str,
        labels: str,
        label_columns: list[str] | None = None,
        image_size: tuple[int, int, int] = (64, 64, 64),
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        fixed_splits: dict[str, list[str]] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            cache, labels, image_size, split_fractions, seed, fixed_splits, batch_size, num_workers
        )
        if label_columns is None:
            label_columns = [c for c, t in self.table.schema.items() if t == pl.Boolean]
        missing = [c for c in label_columns if c not in self.table.columns]
        if missing or not label_columns:
            raise TaskDataError(
                f"label table {labels} lacks the label columns {missing or '(no boolean columns)'}; "
                f"columns are {self.table.columns}"
            )
        self.label_columns = list(label_columns)

    def targets(self, study_id: str) -> dict[str, torch.Tensor]:
        row = self._rows[study_id]
        values = [row[c] for c in self.label_columns]
        return {
            "labels": torch.tensor([float(v) if v is not None else 0.0 for v in values]),
            "label_mask": torch.tensor([v is not None for v in values]),
        }

    def positive_fraction(self, split: str = "train") -> torch.Tensor:
        """Fraction of positives per class among the split's known labels ([K])."""
        rows = self.table.filter(pl.col("study_id").is_in(self.study_ids(split)))
        return torch.tensor([float(rows[c].cast(pl.Float64).mean() or 0.0) for c in self.label_columns])


class SurvivalDataModule(StudyTableDataModule):
    """Time-to-event targets from `ehr labels` output: list columns tte_time (days), tte_event, has_ehr.

    `task_names` come from the table's `fm3d.ehr_labels` metadata when present.
    """

    def __init__(
        self,
        cache: str,
        labels: str,
        image_size: tuple[int, int, int] = (64, 64, 64),
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        fixed_splits: dict[str, list[str]] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            cache, labels, image_size, split_fractions, seed, fixed_splits, batch_size, num_workers
        )
        missing = [c for c in ("tte_time", "tte_event") if c not in self.table.columns]
        if missing:
            raise TaskDataError(f"label table {labels} lacks {missing}; write it with `fm3d ehr labels` ")
        self.num_tasks = len(self.table["tte_time"][0])
        self.task_names = _ehr_task_names(labels) or [f"task_{k}" for k in range(self.num_tasks)]

    def targets(self, study_id: str) -> dict[str, torch.Tensor]:
        row = self._rows[study_id]
        has_ehr = bool(row.get("has_ehr", True))
        return {
            "tte_time": torch.tensor(row["tte_time"], dtype=torch.float32),
            "tte_event": torch.tensor(row["tte_event"], dtype=torch.bool),
            "has_ehr": torch.tensor(has_ehr),
        }

    def event_times(self, split: str = "train") -> np.ndarray:
        """Observed event times (days) of the split's studies with EHR, all tasks pooled (for bin edges)."""
        rows = self.table.filter(pl.col("study_id").is_in(self.study_ids(split)))
        if "has_ehr" in rows.columns:
            rows = rows.filter(pl.col("has_ehr"))
        times = np.asarray(rows["tte_time"].to_list(), dtype=np.float64).reshape(-1)
        events = np.asarray(rows["tte_event"].to_list(), dtype=bool).reshape(-1)
        return times[events]


def _ehr_task_names(path: str | Path) -> list[str] | None:
    """Task codes from the description `fm3d ehr labels` stores in the parquet, if there is one."""
    if Path(path).suffix != ".parquet":
        return None
    try:
        description = read_label_description(path)
    except TaskSpecError:
        return None
    return [str(name) for name in description.get("tasks", [])] or None
