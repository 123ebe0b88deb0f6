"""`CTDataModule`: prepared cache + reports + EHR labels -> train/val/test/predict loaders.

Every constructor argument is a plain typed value so LightningCLI fills it from YAML::

    data:
      class_path: fm3d.data.datamodule.CTDataModule
      init_args: {cache_dir: demo/cache, labels: demo/labels.parquet, voco: v2, image_size: [32, 96, 96]}

`num_phenotypes` and `num_tasks` read the label table's array widths, so a model config can
be linked to them (`parser.link_arguments("data.num_phenotypes", "model.num_phenotypes",
apply_on="instantiate")`).

Randomness: every training draw is a function of (seed, epoch, position). The train loader
uses `EpochSampler`, a `DistributedSampler` (so Lightning keeps it under DDP and calls its
`set_epoch` every epoch) that shuffles by (seed, epoch) and passes the epoch inside each index;
the dataset seeds each sample from it. A run therefore draws the same samples whatever its
`num_workers`, and a run resumed from an epoch-end checkpoint draws what an uninterrupted run
would, with no sampling state to save. Mid-epoch resumption restarts the epoch's permutation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fm3d.data.augment import AugmentConfig
from fm3d.data.cache import PreparedCache
from fm3d.data.datasets import (
    DEFAULT_LABEL_COLUMNS,
    DEFAULT_REPORT_COLUMNS,
    CTDataset,
    LabelTable,
    ReportTable,
    SampleSpec,
    collate_samples,
    read_table,
)
from fm3d.data.split import split_studies

logger = logging.getLogger(__name__)


class EpochSampler(DistributedSampler):
    """`DistributedSampler` whose indices carry the epoch: `epoch * len(dataset) + position`.

    Shuffling by (seed, epoch) is DistributedSampler's own; passing the epoch along lets the
    dataset seed each sample by (seed, epoch, position) even inside persistent workers, which
    never see `set_epoch`.
    """

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + position for position in super().__iter__())


class CTDataModule(L.LightningDataModule):
    """Loaders over a prepared cache with a patient-level split (see module docstring).

    Args:
        cache_dir: folder written by `fm3d prepare`.
        reports: parquet/CSV of report text by study_id; None reads `report_columns` from
            the cache index when the manifest carried them, else no reports.
        labels: parquet of per-study label arrays by study_id (e.g. from `fm3d ehr labels`);
            None for no EHR targets.
        report_columns: text columns joined with a newline into `report`.
        label_columns: array columns of `labels` put into the batch under their own names.
        image_size: (D, H, W) of the global view; None for none.
        image_region: voxels read for the global view before resizing to image_size.
        hu_window: HU clipped and scaled to `intensity_range`.
        intensity_range: the values the window's ends map to: [0, 1] (VoCo, Merlin) or
            [-1, 1] (CT-CLIP; zero-centred input, which the demo's from-scratch ViT needs).
        voco: "v1", "v2", "tiny" or None.
        split_fractions: train/val/test shares of patients.
        seed: split and sampling seed.
        augment: random augmentation of training samples.
        flip_prob, rot90_prob, shift_prob, shift_offset, scale_prob, scale_factor: see
            `fm3d.data.augment.AugmentConfig` (defaults: VoCo-v2's).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        reports: str | Path | None = None,
        labels: str | Path | None = None,
        report_columns: tuple[str, ...] = DEFAULT_REPORT_COLUMNS,
        label_columns: tuple[str, ...] = DEFAULT_LABEL_COLUMNS,
        image_size: tuple[int, int, int] | None = (160, 224, 224),
        image_region: tuple[int, int, int] | None = None,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        intensity_range: tuple[float, float] = (0.0, 1.0),
        voco: str | None = None,
        batch_size: int = 2,
        num_workers: int = 4,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        augment: bool = True,
        flip_prob: float = 0.2,
        rot90_prob: float = 0.2,
        shift_prob: float = 0.5,
        shift_offset: float = 0.1,
        scale_prob: float = 0.0,
        scale_factor: float = 0.1,
        persistent_workers: bool = True,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir)
        self.reports_path = None if reports is None else Path(reports)
        self.labels_path = None if labels is None else Path(labels)
        self.report_columns, self.label_columns = tuple(report_columns), tuple(label_columns)
        augmentation = AugmentConfig(
            flip_prob, rot90_prob, shift_prob, shift_offset, scale_prob, scale_factor
        )
        self.spec = SampleSpec(
            image_size=None if image_size is None else tuple(image_size),
            image_region=None if image_region is None else tuple(image_region),
            hu_window=tuple(hu_window),
            intensity_range=tuple(intensity_range),
            voco=voco,
            augment=augmentation if augment else None,
        )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.split_fractions, self.seed = tuple(split_fractions), seed
        self.persistent_workers, self.pin_memory = persistent_workers, pin_memory
        self.datasets: dict[str, CTDataset] = {}

    # What the model needs to know about the data, before setup (for LightningCLI links).
    @cached_property
    def label_table(self) -> LabelTable | None:
        if self.labels_path is None:
            return None
        return LabelTable(read_table(self.labels_path), self.label_columns, self.labels_path)

    @property
    def label_widths(self) -> dict[str, int]:
        """Array width per label column ({} without labels)."""
        return {} if self.label_table is None else self.label_table.widths

    @property
    def num_phenotypes(self) -> int:
        """Width of the "phenotype" label column (0 without one)."""
        return self.label_widths.get("phenotype", 0)

    @property
    def num_tasks(self) -> int:
        """Width of the "tte_time" label column: time-to-event tasks (0 without one)."""
        return self.label_widths.get("tte_time", 0)

    def encoder_input_settings(self) -> dict[str, tuple[float, ...]]:
        """What an encoder trained on these loaders expects of its input, as encoder config fields.

        `hu_window` is the window the loaders clip and `intensity_range` what they scale it to;
        `target_spacing_mm` the spacing the cache was prepared at (left out when its studies
        disagree). The pretraining module writes them into the encoder's config, so an exported
        encoder says how to feed it.
        """
        settings: dict[str, tuple[float, ...]] = {
            "hu_window": tuple(float(v) for v in self.spec.hu_window),
            "intensity_range": tuple(float(v) for v in self.spec.intensity_range),
        }
        spacings = {
            tuple(float(v) for v in s) for s in PreparedCache(self.cache_dir).index["spacing"].to_list()
        }
        if len(spacings) == 1:
            settings["target_spacing_mm"] = spacings.pop()
        return settings

    def _report_table(self, cache: PreparedCache) -> ReportTable | None:
        if self.reports_path is not None:
            return ReportTable(read_table(self.reports_path), self.report_columns, self.reports_path)
        present = [c for c in self.report_columns if c in cache.index.columns]
        if not present:
            logger.info("no reports: %s has none of the columns %s", cache.root, self.report_columns)
            return None
        return ReportTable(cache.index.select("study_id", *present), present, cache.root / "index.parquet")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cache = PreparedCache(self.cache_dir)
        reports = self._report_table(cache)
        table = split_studies(cache.index.select("study_id", "patient_id"), self.split_fractions, self.seed)
        for split in ("train", "val", "test"):
            ids = table.filter(pl.col("split") == split)["study_id"].to_list()
            if not ids:
                logger.warning(
                    "the %s split of %s is empty (%d studies in all)", split, cache.root, table.height
                )
            self.datasets[split] = CTDataset(
                cache, ids, self.spec, reports, self.label_table, train=split == "train", seed=self.seed
            )
        self.datasets["predict"] = CTDataset(
            cache, None, self.spec, reports, self.label_table, train=False, seed=self.seed
        )
        logger.info(
            "CTDataModule: %s",
            ", ".join(f"{name} {len(ds)}" for name, ds in self.datasets.items()),
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        sampler = None
        if shuffle:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            sampler = EpochSampler(
                dataset,
                num_replicas=torch.distributed.get_world_size() if distributed else 1,
                rank=torch.distributed.get_rank() if distributed else 0,
                shuffle=True,
                seed=self.seed,
            )
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,  # None: in order (evaluation samples are seeded per position)
            drop_last=sampler is not None and len(sampler) >= self.batch_size,
            num_workers=workers,
            collate_fn=collate_samples,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Every prepared study, in index order (embedding extraction)."""
        return self._loader("predict", shuffle=False)
