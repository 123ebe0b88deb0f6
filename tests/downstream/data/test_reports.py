"""The report data module: reports from the cache index or a report table, joined to a real prepared cache."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from downstream.data import ReportDataModule, TaskDataError
from fm3d.data.base import LoaderSettings
from fm3d.data.tables import TableError


def test_reports_from_the_cache_index(demo_cohort: Path) -> None:
    manifest = pl.read_parquet(demo_cohort / "manifest.parquet")
    module = ReportDataModule(
        demo_cohort / "cache", image_size=(16, 32, 32), loader=LoaderSettings(split_fractions=(1.0, 0.0, 0.0))
    )
    module.setup("fit")
    assert sorted(module.splits["train"]) == sorted(manifest["study_id"])
    dataset = module.dataset("train")
    for i in range(len(dataset)):
        sample = dataset[i]
        row = manifest.row(by_predicate=pl.col("study_id") == sample["study_id"], named=True)
        assert sample["report"] == f"{row['findings'].strip()}\n{row['impression'].strip()}"
        assert sample["image"].shape == (1, 16, 32, 32)


def test_a_report_table_keyed_by_volume_file(demo_cohort: Path, tmp_path: Path) -> None:
    manifest = pl.read_parquet(demo_cohort / "manifest.parquet")
    ids = manifest["study_id"].to_list()
    csv = tmp_path / "reports.csv"
    pl.DataFrame(
        {
            "VolumeName": [f"{s}.nii.gz" for s in ids],
            # one empty report: that study is left out
            "Impressions_EN": ["", *(f"impression {k}" for k in range(1, len(ids)))],
        }
    ).write_csv(csv)
    module = ReportDataModule(
        demo_cohort / "cache", csv, ["Impressions_EN"], "VolumeName",
        loader=LoaderSettings(split_fractions=(1.0, 0.0, 0.0)),
    )  # fmt: skip
    module.setup("fit")
    assert sorted(module.splits["train"]) == sorted(ids[1:])
    assert module.targets(ids[3]) == {"report": "impression 3"}

    wrong_id = ReportDataModule(demo_cohort / "cache", csv, ["Impressions_EN"], "study_id")
    with pytest.raises(TableError, match=rf"{csv}: .*study_id.*data.id_column"):
        wrong_id.setup("fit")
    absent = ReportDataModule(demo_cohort / "cache", report_columns=["summary"])
    with pytest.raises(
        TaskDataError, match=r"index.parquet: has no report columns \['summary'\]. Give data.reports"
    ):
        absent.setup("fit")
