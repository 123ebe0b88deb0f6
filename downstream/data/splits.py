"""The split logic every downstream data module shares: a prepared cache split by patient or fixed lists."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from downstream.data.errors import TaskDataError
from fm3d.data.cache import PreparedCache
from fm3d.data.split import SPLITS, split_studies

logger = logging.getLogger(__name__)


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
