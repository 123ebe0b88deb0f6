"""`CTDataModule`: prepared cache + reports + EHR labels -> train/val/test/predict loaders.

Every constructor argument is a plain typed value so LightningCLI fills it from YAML::

    data:
      class_path: fm3d.data.datamodule.CTDataModule
      init_args: {cache_dir: demo/cache, labels: demo/labels.parquet, voco: v2, image_size: [32, 96, 96]}

`num_phenotypes` and `num_tasks` read the label table's array widths, so a model config can
be linked to them (`parser.link_arguments("data.num_phenotypes", "model.num_phenotypes",
apply_on="instantiate")`).

Randomness: the train loader shuffles with a generator seeded from `seed`, and each worker
restarts its dataset's random stream from (seed, rank, worker seed), so a run with the same
seed, world size and `num_workers` draws the same samples. The module's `state_dict` (saved
in Lightning checkpoints) holds the shuffle generator and, with `num_workers=0`, the dataset's
stream, so a run resumed from an epoch-end checkpoint draws what an uninterrupted run would.
With workers, their seeds come from the restored generator, which reproduces the stream too
unless `persistent_workers` kept the workers' streams running across epochs. Mid-epoch
resumption is not reproduced.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader, get_worker_info

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


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: restart the worker's dataset stream from (rank, worker seed)."""
    info = get_worker_info()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    info.dataset.reseed(rank, info.seed % 2**32)


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
        hu_window: HU clipped and scaled to [0, 1].
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
            voco=voco,
            augment=augmentation if augment else None,
        )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.split_fractions, self.seed = tuple(split_fractions), seed
        self.persistent_workers, self.pin_memory = persistent_workers, pin_memory
        self.datasets: dict[str, CTDataset] = {}
        # One generator for the module's lifetime: a re-created loader continues the stream
        # instead of replaying the first epoch's shuffle and worker seeds.
        self._generator = torch.Generator().manual_seed(seed)
        self._restored_rng_state: dict | None = None

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
        if self._restored_rng_state is not None:
            self.datasets["train"].set_rng_state(self._restored_rng_state)
        self.datasets["predict"] = CTDataset(
            cache, None, self.spec, reports, self.label_table, train=False, seed=self.seed
        )
        logger.info(
            "CTDataModule: %s",
            ", ".join(f"{name} {len(ds)}" for name, ds in self.datasets.items()),
        )

    def state_dict(self) -> dict:
        """Sampling state for exact resumption; values load with `torch.load(weights_only=True)`."""
        train = self.datasets.get("train")
        return {
            "generator": self._generator.get_state(),
            "dataset_rng": None if train is None else train.rng_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue sampling from a checkpoint's state (Lightning calls this after `setup`)."""
        self._generator.set_state(state_dict["generator"])
        self._restored_rng_state = state_dict.get("dataset_rng")
        if self._restored_rng_state is not None and "train" in self.datasets:
            self.datasets["train"].set_rng_state(self._restored_rng_state)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.datasets[split]) >= self.batch_size,
            num_workers=workers,
            collate_fn=collate_samples,
            worker_init_fn=seed_worker if workers > 0 else None,
            generator=self._generator if shuffle else None,  # eval samples are seeded per index
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
