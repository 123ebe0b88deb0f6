"""CT + report pairs for the language tasks (retrieval, report generation), from a prepared cache.

Reports come from the cache index when the manifest carried report columns (the demo cohort's
`findings` and `impression`), or from a report table: a CSV/parquet with an id column and text
columns, e.g. CT-RATE's `VolumeName, Findings_EN, Impressions_EN` (`id_column: VolumeName`,
`report_columns: [Findings_EN, Impressions_EN]`). Ids are matched to the cache's study_id with a
NIfTI suffix removed ("valid_1_a_1.nii.gz" -> "valid_1_a_1"). The chosen columns are joined with
a newline; studies whose report is empty are left out (a retrieval gallery or a generation target
needs text). Images are one fixed-size crop per study (centred; jittered in training), float HU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from downstream.data.errors import TaskDataError
from downstream.data.study_crops import StudyCropDataModule
from fm3d.data.cache import PreparedCache

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def study_id_from_name(name: str) -> str:
    """A study id from a volume file name: the NIfTI suffix removed."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def join_report(row: dict[str, Any], columns: list[str]) -> str:
    """The report columns of one row joined by a newline (missing cells skipped)."""
    parts = [str(row[c]).strip() for c in columns if row.get(c) is not None and str(row[c]).strip()]
    return "\n".join(parts)


def read_reports(path: str | Path, report_columns: list[str], id_column: str = "study_id") -> dict[str, str]:
    """study_id -> report text from a CSV/parquet report table (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"report table {path} does not exist")
    table = pl.read_csv(path, infer_schema=False) if path.suffix == ".csv" else pl.read_parquet(path)
    missing = [c for c in (id_column, *report_columns) if c not in table.columns]
    if missing:
        raise TaskDataError(
            f"report table {path} lacks the columns {missing} (columns: {table.columns}); set "
            "data.id_column / data.report_columns"
        )
    reports = {
        study_id_from_name(str(row[id_column])): join_report(row, report_columns)
        for row in table.iter_rows(named=True)
    }
    return {k: v for k, v in reports.items() if v}


class ReportDataModule(StudyCropDataModule):
    """Prepared CTs paired with report text (see the module docstring).

    Args:
        cache: folder written by `fm3d prepare`.
        reports: report table (CSV/parquet); None reads `report_columns` from the cache index.
        report_columns: text columns joined (newline) into the report.
        id_column: the report table's column naming the study (or volume file).
        image_size: (D, H, W) crop in voxels.
        (split_fractions, seed, fixed_splits, batch_size, num_workers: see CacheDataModule.)
    """

    # Training crops shift by up to an eighth of their size: the report describes the whole view.
    crop_shift = 0.125

    def __init__(
        self,
        cache: str,
        reports: str | None = None,
        report_columns: list[str] = ("findings", "impression"),
        id_column: str = "study_id",
        image_size: tuple[int, int, int] = (64, 64, 64),
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        fixed_splits: dict[str, list[str]] | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(cache, split_fractions, seed, fixed_splits, batch_size, num_workers)
        self.reports_path = reports
        self.report_columns = list(report_columns)
        self.id_column = id_column
        self.image_size = tuple(image_size)
        self.reports: dict[str, str] = {}

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        if self.reports_path is not None:
            self.reports = read_reports(self.reports_path, self.report_columns, self.id_column)
            source = self.reports_path
        else:
            missing = [c for c in self.report_columns if c not in cache.index.columns]
            if missing:
                raise TaskDataError(
                    f"the index of {cache.root} has no report columns {missing}; give data.reports (a report "
                    "CSV/parquet) or list the manifest's report columns in data.report_columns"
                )
            rows = cache.index.select("study_id", *self.report_columns).iter_rows(named=True)
            self.reports = {r["study_id"]: join_report(r, self.report_columns) for r in rows}
            self.reports = {k: v for k, v in self.reports.items() if v}
            source = cache.root / "index.parquet"
        usable = [s for s in cache.study_ids if s in self.reports]
        if not usable:
            raise TaskDataError(
                f"no study of {cache.root} has a non-empty report in {source}; the ids must match study_id "
                f"(a NIfTI suffix is removed from {self.id_column!r})"
            )
        if len(usable) < len(cache.study_ids):
            logger.warning("%d studies without a report are left out", len(cache.study_ids) - len(usable))
        return usable

    def targets(self, study_id: str) -> dict[str, str]:
        """The study's report, what `StudyCrops` adds to each crop."""
        return {"report": self.reports[study_id]}
