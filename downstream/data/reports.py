"""CT + report pairs for the language tasks (retrieval, report generation), from a prepared cache.

Reports come from the cache index when the manifest carried report columns (the demo cohort's
`findings` and `impression`), or from a report table: a CSV/parquet with an id column and text
columns, e.g. CT-RATE's `VolumeName, Findings_EN, Impressions_EN` (`id_column: VolumeName`,
`report_columns: [Findings_EN, Impressions_EN]`), read by fm3d's `ReportTable` (ids are matched
to the cache's study_id with a NIfTI suffix removed: "valid_1_a_1.nii.gz" -> "valid_1_a_1").
The chosen columns are joined with a newline; studies whose report is empty are left out (a
retrieval gallery or a generation target needs text). Images are one fixed-size crop per study
(centred; jittered in training), float HU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from downstream.data.errors import TaskDataError
from downstream.data.study_crops import TASK_LOADER, StudyCropDataModule
from fm3d.data.base import LoaderSettings
from fm3d.data.cache import INDEX_FILE, PreparedCache
from fm3d.data.tables import ReportTable

logger = logging.getLogger(__name__)


class ReportDataModule(StudyCropDataModule):
    """Prepared CTs paired with report text (see the module docstring).

    Args:
        cache_dir: folder written by `fm3d prepare`.
        reports: report table (CSV/parquet); None reads `report_columns` from the cache index.
        report_columns: text columns joined (newline) into the report.
        id_column: the report table's column naming the study (or volume file).
        image_size: (D, H, W) crop in voxels.
        loader: batch size, workers, split fractions, seed and fixed splits (`LoaderSettings`).
    """

    # Training crops shift by up to an eighth of their size: the report describes the whole view.
    crop_shift = 0.125

    def __init__(
        self,
        cache_dir: str | Path,
        reports: str | Path | None = None,
        report_columns: Sequence[str] = ("findings", "impression"),
        id_column: str = "study_id",
        image_size: tuple[int, int, int] = (64, 64, 64),
        loader: LoaderSettings = TASK_LOADER,
    ) -> None:
        super().__init__(cache_dir, image_size, loader)
        self.reports_path = None if reports is None else Path(reports)
        self.report_columns = list(report_columns)
        self.id_column = id_column
        self.reports: ReportTable | None = None

    def _read_reports(self, cache: PreparedCache) -> tuple[ReportTable, Path]:
        """The report table and where it came from: `reports`, else the cache index's columns."""
        if self.reports_path is not None:
            return ReportTable.read(self.reports_path, self.report_columns, self.id_column), self.reports_path
        missing = [c for c in self.report_columns if c not in cache.index.columns]
        if missing:
            raise TaskDataError(
                cache.root / INDEX_FILE,
                f"has no report columns {missing}",
                "give data.reports (a report CSV/parquet) or list the manifest's report columns in "
                "data.report_columns",
            )
        return ReportTable.from_index(cache, self.report_columns), cache.root / INDEX_FILE

    def eligible_studies(self, cache: PreparedCache) -> list[str]:
        self.reports, source = self._read_reports(cache)
        with_text = set(self.reports.study_ids_with_text())
        usable = [s for s in cache.study_ids if s in with_text]
        if not usable:
            raise TaskDataError(
                source,
                f"has no non-empty report for a study of {cache.root}",
                f"its ids must match study_id (a NIfTI suffix is removed from {self.id_column!r})",
            )
        if len(usable) < len(cache.study_ids):
            logger.warning("%d studies without a report are left out", len(cache.study_ids) - len(usable))
        return usable

    def targets(self, study_id: str) -> dict[str, str]:
        """The study's report, what `StudyCrops` adds to each crop."""
        return {"report": self.reports.get(study_id)}
