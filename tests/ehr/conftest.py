"""EHR test fixtures: a writable copy of the real MIMIC-IV demo MEDS, and a way to damage it."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

DAMAGED_SHARD = Path("data") / "tuning" / "0.parquet"
SENTINEL = datetime(9999, 12, 31)


@pytest.fixture
def demo_meds(shared_data, tmp_path) -> Path:
    """A copy of ../shared/data/ehr/mimic_iv_demo_meds in tmp_path, free to corrupt."""
    return Path(shutil.copytree(shared_data / "ehr" / "mimic_iv_demo_meds", tmp_path / "meds"))


def _damage_events(root: Path, null_codes: int, sentinel_times: int) -> None:
    """Give one shard `null_codes` null codes and end its last subject with 9999-12-31 events.

    The sentinel rows are the shard's last rows, so the shard stays sorted: only the dates are wrong.
    """
    path = root / DAMAGED_SHARD
    frame = pl.read_parquet(path).with_row_index("_row")
    height = frame.height
    frame = frame.with_columns(
        code=pl.when(pl.col("_row").is_in(list(range(10, 10 + 10 * null_codes, 10))))
        .then(None)
        .otherwise("code"),
        time=pl.when(pl.col("_row") >= height - sentinel_times).then(pl.lit(SENTINEL)).otherwise("time"),
    )
    frame.drop("_row").write_parquet(path)


@pytest.fixture
def damaged_meds(demo_meds) -> Path:
    """The demo copy with 3 null codes and 2 events dated 9999-12-31 in data/tuning/0.parquet."""
    _damage_events(demo_meds, null_codes=3, sentinel_times=2)
    return demo_meds


def _admission_studies(events: pl.LazyFrame) -> pl.DataFrame:
    """One study per hospital admission in `events`, at its admission time (naive, read as UTC)."""
    return (
        events.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//"))
        .select("subject_id", study_time="time")
        .unique()
        .sort("subject_id", "study_time")
        .with_columns(study_id=pl.format("adm{}", pl.int_range(pl.len())))
        .collect()
    )


@pytest.fixture(scope="session")
def admission_studies():
    """`admission_studies(events)`: the studies table the EHR tests build from real admissions."""
    return _admission_studies
