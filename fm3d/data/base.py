"""The split-aware base of every data module over a prepared cache, and the settings all of them share.

`StudyDataModule` opens a `fm3d prepare` cache, splits the studies a subclass can use
(`eligible_studies`) by patient (`fm3d.data.split.split_studies`), lets `fixed_splits` override
named splits, and serves one DataLoader per split from the dataset a subclass builds
(`dataset(split)`). Every module takes its loader settings as one YAML block::

    data:
      init_args:
        cache_dir: demo/cache
        loader: {batch_size: 8, num_workers: 4, split_fractions: [0.8, 0.1, 0.1], seed: 0}

Randomness: the train loader uses `EpochSampler`, a `DistributedSampler` (so Lightning keeps
it under DDP and calls its `set_epoch` every epoch) that shuffles by (seed, epoch). A dataset
that sets `epoch_in_index = True` receives `epoch * len(dataset) + position` and can seed each
sample by (seed, epoch, position): the same draws whatever `num_workers`, and a run resumed
from an epoch-end checkpoint draws what an uninterrupted run would, with no sampling state to
save. Mid-epoch resumption restarts the epoch's permutation. Other splits load in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fm3d.data.cache import PreparedCache
from fm3d.data.collate import collate_samples
from fm3d.data.errors import DataError
from fm3d.data.split import SPLITS, split_studies
from fm3d.data.streaming import open_cache

logger = logging.getLogger(__name__)


@dataclass
class LoaderSettings:
    """What every data module's loaders share (YAML: `data.init_args.loader`).

    batch_size: samples per batch (evaluation of whole volumes may ask for fewer).
    num_workers: DataLoader worker processes (0: load in the main process).
    split_fractions: (train, val, test) shares of patients.
    seed: split and sampling seed.
    fixed_splits: split name ("train", "val", "test", "predict") -> study ids; overrides the
        patient split for the names it lists (e.g. a smoke run that trains and tests on one study).
    persistent_workers: keep workers alive between epochs (when num_workers > 0).
    pin_memory: page-locked batches for faster host-to-GPU copies (only when CUDA is present).
    """

    batch_size: int = 2
    num_workers: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    fixed_splits: dict[str, list[str]] | None = None
    persistent_workers: bool = True
    pin_memory: bool = True

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)


class EpochSampler(DistributedSampler):
    """`DistributedSampler` whose indices may carry the epoch: `epoch * len(dataset) + position`.

    Shuffling by (seed, epoch) is DistributedSampler's own; passing the epoch along
    (`epoch_in_index`) lets the dataset seed each sample by (seed, epoch, position) even inside
    persistent workers, which never see `set_epoch`.
    """

    def __init__(self, dataset: Dataset, *args, epoch_in_index: bool = False, **kwargs) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch_in_index = epoch_in_index

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset) if self.epoch_in_index else 0
        return (offset + position for position in super().__iter__())


class StudyDataModule(L.LightningDataModule):
    """Loaders over a prepared cache with a patient-level split (see the module docstring).

    Subclasses implement `dataset(split)` and may narrow `eligible_studies`. `predict_split`
    says what "predict" loads: None for every eligible study (embedding extraction), or the
    name of a split (a task's held-out studies).

    Args:
        cache_dir: folder written by `fm3d prepare`.
        loader: the shared loader settings (`LoaderSettings`).
    """

    predict_split: ClassVar[str | None] = None
    # Drop a ragged last training batch when there is at least one full one (batch norm, DDP).
    drop_last_train: ClassVar[bool] = True

    def __init__(self, cache_dir: str | Path, loader: LoaderSettings | None = None) -> None:
        super().__init__()
        # A URL (a streaming pack in an object store) stays text: Path would fold its "//".
        self.cache_dir = cache_dir if "://" in str(cache_dir) else Path(cache_dir)
        self.loader_settings = loader or LoaderSettings()
        self.cache: PreparedCache | None = None
        self.splits: dict[str, list[str]] = {}

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        """Studies this module can use (all prepared studies, by default)."""
        return list(cache.study_ids)

    def setup(self, stage: str | None = None) -> None:
        """Open the cache and split its eligible studies (once; later calls keep the split)."""
        if self.cache is not None:
            return
        cache = open_cache(self.cache_dir)
        settings = self.loader_settings
        eligible = self.eligible_studies(cache)
        index = cache.index.filter(pl.col("study_id").is_in(eligible))
        table = split_studies(index.select("study_id", "patient_id"), settings.split_fractions, settings.seed)
        splits = {name: table.filter(pl.col("split") == name)["study_id"].to_list() for name in SPLITS}
        splits["predict"] = (
            index["study_id"].to_list() if self.predict_split is None else splits[self.predict_split]
        )
        known = set(eligible)
        for name, ids in (settings.fixed_splits or {}).items():
            unknown = sorted(set(ids) - known)
            if unknown:
                raise DataError(
                    self.cache_dir,
                    f"fixed_splits[{name!r}] names studies {unknown[:5]} that are not usable here",
                    "list prepared study ids (see index.parquet) in data.loader.fixed_splits",
                )
            splits[name] = list(ids)
        self.cache, self.splits = cache, splits
        logger.info("%s splits: %s", type(self).__name__, {k: len(v) for k, v in splits.items()})

    def study_ids(self, split: str) -> list[str]:
        """The studies of a split; an empty split is an error that says how to fix it."""
        ids = self.splits.get(split, [])
        if not ids:
            sizes = {k: len(v) for k, v in self.splits.items()}
            raise DataError(
                self.cache_dir,
                f"the {split!r} split is empty (split sizes {sizes})",
                "use more studies, other data.loader.split_fractions or seed, or data.loader.fixed_splits",
            )
        return ids

    def dataset(self, split: str) -> Dataset:
        """The dataset of a split ("train", "val", "test", "predict"); subclasses build it."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to build its datasets")

    def loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """The DataLoader of a split: shuffled by `EpochSampler` for "train", in order otherwise."""
        dataset = self.dataset(split)
        settings = self.loader_settings
        batch_size = batch_size or settings.batch_size
        sampler = None
        if split == "train":
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            sampler = EpochSampler(
                dataset,
                num_replicas=torch.distributed.get_world_size() if distributed else 1,
                rank=torch.distributed.get_rank() if distributed else 0,
                shuffle=True,
                seed=settings.seed,
                epoch_in_index=getattr(dataset, "epoch_in_index", False),
            )
        workers = settings.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,  # None: in order (evaluation samples are seeded per position)
            drop_last=sampler is not None and self.drop_last_train and len(sampler) >= batch_size,
            num_workers=workers,
            collate_fn=collate_samples,
            persistent_workers=settings.persistent_workers and workers > 0,
            pin_memory=settings.pin_memory and torch.cuda.is_available(),
            # Its own generator: each epoch's iterator draws the workers' base seed from it, not from
            # the global RNG the model's dropout uses. Else a resumed run's dropout masks would
            # depend on whether the strategy restores the RNG before or after the first iterator
            # exists (FSDP2 restores after setup, DDP before). Samples are seeded per position anyway.
            generator=torch.Generator().manual_seed(settings.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
