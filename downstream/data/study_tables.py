"""Prepared CTs joined by study_id to a per-study label table: classification and survival targets.

- `ClassificationDataModule`: a per-study table of binary columns (e.g. the demo cohort's
  `findings.parquet`), batch key `labels` [B, K] float and `label_mask` [B, K] bool.
- `SurvivalDataModule`: `ehr labels` output (`tte_time`, `tte_event` list columns, `has_ehr`),
  batch keys as in the batch contract, read through fm3d's `LabelTable`.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import polars as pl
import torch

from downstream.data.errors import TaskDataError
from downstream.data.study_crops import TASK_LOADER, StudyCropDataModule
from ehr.errors import TaskSpecError
from ehr.labels import read_label_description
from fm3d.data.base import LoaderSettings
from fm3d.data.cache import PreparedCache
from fm3d.data.tables import LabelTable, read_table

logger = logging.getLogger(__name__)


class StudyTableDataModule(StudyCropDataModule):
    """Prepared CTs joined by study_id to a per-study label table (parquet or CSV); subclasses say
    which columns are targets. Studies without a row are left out with a warning.

    A table without a column of `required_columns` is refused when the module is built, with
    `missing_columns_fix` as the fix.
    """

    required_columns: ClassVar[tuple[str, ...]] = ()
    missing_columns_fix: ClassVar[str] = ""

    def __init__(
        self,
        cache_dir: str | Path,
        labels: str | Path,
        image_size: tuple[int, int, int] = (64, 64, 64),
        loader: LoaderSettings = TASK_LOADER,
    ) -> None:
        super().__init__(cache_dir, image_size, loader)
        self.labels_path = Path(labels)
        self.table = read_table(labels)
        missing = [c for c in self.required_columns if c not in self.table.columns]
        if missing:
            raise TaskDataError(self.labels_path, f"lacks the columns {missing}", self.missing_columns_fix)
        self._rows = {row["study_id"]: row for row in self.table.iter_rows(named=True)}

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        joined = [s for s in cache.study_ids if s in self._rows]
        if not joined:
            raise TaskDataError(
                self.labels_path,
                f"names no study of {cache.root}",
                "its study_id values must be the prepared cache's (see its index.parquet)",
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
        cache_dir: str | Path,
        labels: str | Path,
        label_columns: list[str] | None = None,
        image_size: tuple[int, int, int] = (64, 64, 64),
        loader: LoaderSettings = TASK_LOADER,
    ) -> None:
        super().__init__(cache_dir, labels, image_size, loader)
        if label_columns is None:
            label_columns = [c for c, t in self.table.schema.items() if t == pl.Boolean]
        missing = [c for c in label_columns if c not in self.table.columns]
        if missing or not label_columns:
            raise TaskDataError(
                self.labels_path,
                f"lacks the label columns {missing or '(no boolean columns)'} (has {self.table.columns})",
                "list its finding columns in data.label_columns",
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

    required_columns = ("tte_time", "tte_event")
    missing_columns_fix = "write it with `fm3d ehr labels`"

    @cached_property
    def outcomes(self) -> LabelTable:
        """The tte_time / tte_event arrays and has_ehr flag of each study."""
        return LabelTable(self.table, self.required_columns, self.labels_path)

    @property
    def num_tasks(self) -> int:
        return self.outcomes.widths["tte_time"]

    @cached_property
    def task_names(self) -> list[str]:
        return _ehr_task_names(self.labels_path) or [f"task_{k}" for k in range(self.num_tasks)]

    def targets(self, study_id: str) -> dict[str, torch.Tensor | bool]:
        arrays, has_ehr = self.outcomes.get(study_id)
        return {
            "tte_time": torch.from_numpy(arrays["tte_time"]),
            "tte_event": torch.from_numpy(arrays["tte_event"]),
            "has_ehr": has_ehr,
        }


def _ehr_task_names(path: Path) -> list[str] | None:
    """Task codes from the description `fm3d ehr labels` stores in the parquet, if there is one."""
    if path.suffix != ".parquet":
        return None
    try:
        description = read_label_description(path)
    except TaskSpecError:
        return None
    return [str(name) for name in description.get("tasks", [])] or None
