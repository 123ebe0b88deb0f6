"""ehr.studies: one table from CSV or parquet, zoned times, unusable rows counted then refused or dropped."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest

from ehr.errors import StudyTableError
from ehr.labels import build_study_labels
from ehr.meds import MEDSDataset
from ehr.studies import check_studies, read_studies
from ehr.validity import ValidityPolicy

TASKS = ["MEDS_DEATH", "HOSPITAL_DISCHARGE//HOME", "HOSPITAL_ADMISSION//EW EMER."]


def test_offset_times_give_the_same_labels_from_csv_and_parquet(shared_data, admission_studies, tmp_path):
    meds = shared_data / "ehr" / "mimic_iv_demo_meds"
    studies = admission_studies(pl.scan_parquet(meds / "data" / "*" / "*.parquet"))
    # The same instants written as +02:00 local times in CSV and as an Asia/Kolkata (+05:30) parquet column.
    utc = pl.col("study_time").dt.replace_time_zone("UTC")
    csv = tmp_path / "studies.csv"
    studies.with_columns(
        study_time=utc.dt.convert_time_zone("Etc/GMT-2").dt.strftime("%Y-%m-%dT%H:%M:%S%:z")
    ).write_csv(csv)
    parquet = tmp_path / "studies.parquet"
    studies.with_columns(study_time=utc.dt.convert_time_zone("Asia/Kolkata")).write_parquet(parquet)
    assert "+02:00" in csv.read_text().splitlines()[1]

    from_csv, from_parquet = read_studies(csv), read_studies(parquet)
    expected = studies.select("study_id", "subject_id", "study_time")
    assert from_csv.equals(expected) and from_parquet.equals(expected)
    dataset = MEDSDataset(meds)
    labels = [build_study_labels(dataset, table, TASKS) for table in (from_csv, from_parquet, expected)]
    assert labels[0].equals(labels[1]) and labels[1].equals(labels[2])
    assert labels[0]["has_ehr"].sum() > 200


def _bad_table(tmp_path) -> str:
    csv = tmp_path / "studies.csv"
    csv.write_text(
        "study_id,subject_id,study_time\n"
        "ok1,10000032,2180-05-06 22:23:00\n"
        "bad_subject,abc,2180-05-06 22:23:00\n"
        "fraction,12.5,2180-05-06 22:23:00\n"
        "sentinel,10000032,9999-12-31 00:00:00\n"
        "no_time,10000032,\n"
        "ok2,10000084,2160-11-21 01:56:00\n"
    )
    return csv


def test_unusable_studies_are_refused_with_counts_and_the_option(tmp_path):
    csv = _bad_table(tmp_path)
    with pytest.raises(
        StudyTableError,
        match=r"studies\.csv: 4 unusable studies: 2 subject_id empty or not an integer \(e\.g\. row 2: "
        r"'abc'\), 1 study_time empty or unparseable \(e\.g\. row 5: None\), 1 study_time outside years "
        r"\(1800, 2300\) \(e\.g\. row 4: 9999-12-31 00:00:00\)\. .*--drop-invalid",
    ):
        read_studies(csv)


def test_unusable_studies_are_dropped_only_on_request(tmp_path, caplog):
    studies = read_studies(_bad_table(tmp_path), policy=ValidityPolicy(drop_invalid=True))
    assert studies["study_id"].to_list() == ["ok1", "ok2"]
    assert studies["subject_id"].to_list() == [10000032, 10000084]
    assert "dropping 4 unusable studies (--drop-invalid" in caplog.text


def test_float_subject_ids_must_be_whole_numbers():
    table = pl.DataFrame(
        {
            "study_id": ["a", "b", "c"],
            "subject_id": [1.0, 2.5, float("nan")],
            "study_time": [datetime(2020, 1, 1)] * 3,
        }
    )
    with pytest.raises(StudyTableError, match=r"2 subject_id empty or not an integer \(e\.g\. row 2: 2\.5\)"):
        check_studies(table)
    kept = check_studies(table, policy=ValidityPolicy(drop_invalid=True))
    assert kept["subject_id"].to_list() == [1] and kept.schema["subject_id"] == pl.Int64


def test_blank_study_ids_count_as_empty():
    table = pl.DataFrame(
        {
            "study_id": ["a", "", "  ", None],
            "subject_id": [1, 2, 3, 4],
            "study_time": [datetime(2020, 1, 1)] * 4,
        }
    )
    with pytest.raises(StudyTableError, match=r"3 empty study_id \(e\.g\. row 2: ''\)"):
        check_studies(table)
    assert check_studies(table, policy=ValidityPolicy(drop_invalid=True))["study_id"].to_list() == ["a"]


def test_a_file_that_is_not_a_table_is_named(tmp_path):
    garbage = tmp_path / "studies.parquet"
    garbage.write_bytes(b"PAR1 but not really" * 5)
    with pytest.raises(
        StudyTableError, match=r"studies\.parquet: cannot be read as a table .*Write it again"
    ):
        read_studies(garbage)
