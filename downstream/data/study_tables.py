"""Prepared CTs joined by study_id to a per-study label table: classification and survival targets.

- `ClassificationDataModule`: a per-study table of binary columns (e.g. the demo cohort's
  `findings.parquet`), batch key `labels` [B, K] float and `label_mask` [B, K] bool.
- `SurvivalDataModule`: `ehr labels` output (`tte_time`, `tte_event` list columns, `has_ehr`),
  batch keys as in the batch contract.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch

from downstream.data.errors import TaskDataError
from downstream.data.study_crops import StudyCropDataModule
from ehr.errors import TaskSpecError
from ehr.labels import read_label_description
from fm3d.data.cache import PreparedCache

logger = logging.getLogger(__name__)


def read_table(path: str | Path) -> pl.DataFrame:
    """A per-study label table from parquet or CSV, with a `study_id` column."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"label table {path} does not exist")
    table = pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path)
    if "study_id" not in table.columns:
        raise TaskDataError(f"label table {path} has no study_id column (columns: {table.columns})")
    return table.with_columns(pl.col("study_id").cast(pl.String))


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
