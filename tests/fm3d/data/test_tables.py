"""Report and label tables: id columns, NIfTI suffixes, string ids from CSV, masks and error messages."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from fm3d.data.cache import PreparedCache
from fm3d.data.tables import LabelTable, ReportTable, TableError, read_table, study_id_from_name


def test_label_table_honours_its_own_has_ehr_column():
    table = pl.DataFrame(
        {"study_id": ["a", "b", "c"], "has_ehr": [True, False, None], "p": [[1.0], [2.0], [3.0]]}
    )
    labels = LabelTable(table, ("p",))
    assert [labels.get(s)[1] for s in ("a", "b", "c", "absent")] == [True, False, False, False]
    assert labels.get("b")[0]["p"].tolist() == [2.0]


def test_table_errors_name_the_problem():
    with pytest.raises(TableError, match="lacks label column 'phenotype'"):
        LabelTable(pl.DataFrame({"study_id": ["a"], "x": [[1.0]]}), ("phenotype",), "labels.parquet")
    with pytest.raises(TableError, match="lengths"):
        LabelTable(pl.DataFrame({"study_id": ["a", "b"], "p": [[1.0], [1.0, 2.0]]}), ("p",))
    with pytest.raises(TableError, match=r"lacks the columns \[.findings.\].*data.report_columns"):
        ReportTable(pl.DataFrame({"study_id": ["a"], "text": ["x"]}), ("findings",))


def test_report_ids_match_with_nifti_suffix_removed(tmp_path: Path):
    csv = tmp_path / "reports.csv"
    csv.write_text(
        "VolumeName,Findings_EN,Impressions_EN\n"
        "valid_1_a_1.nii.gz,  Liver cyst. ,Cyst.\n"
        "valid_2_a_1.nii,,No findings.\n"
        "valid_3_a_1,,\n"
    )
    reports = ReportTable.read(csv, ["Findings_EN", "Impressions_EN"], id_column="VolumeName")
    assert reports.get("valid_1_a_1") == "Liver cyst.\nCyst."
    assert reports.get("valid_2_a_1") == "No findings."  # the empty cell is skipped, no stray newline
    assert reports.get("valid_3_a_1") == "" and reports.get("absent") == ""
    assert reports.study_ids_with_text() == ["valid_1_a_1", "valid_2_a_1"]
    assert study_id_from_name("a.b.nii.gz") == "a.b" and study_id_from_name("scan.nrrd") == "scan.nrrd"


def test_csv_ids_stay_strings(tmp_path: Path):
    csv = tmp_path / "reports.csv"
    csv.write_text("study_id,findings,impression\n0012,1.50,x\n0100,,y\n")
    reports = ReportTable.read(csv, ["findings", "impression"])
    assert reports.get("0012") == "1.50\nx"  # not study 12, and not the float 1.5
    assert reports.study_ids_with_text() == ["0012", "0100"]
    assert read_table(csv, as_strings=True)["study_id"].to_list() == ["0012", "0100"]


def test_reports_from_the_cache_index(tmp_path: Path):
    index = tmp_path / "index.parquet"
    columns = {c: [None, None] for c in ("patient_id", "image_file", "label_file", "shape", "spacing")}
    columns |= {
        c: [None, None] for c in ("affine", "hu_p1", "hu_p50", "hu_p99", "source_path", "source_hash")
    }
    pl.DataFrame(
        {
            "study_id": ["a", "b"],
            "status": ["ok", "ok"],
            **columns,
            "settings": ["{}", "{}"],
            "record": ["{}", "{}"],
            "impression": ["Normal.", " "],
        }
    ).write_parquet(index)
    reports = ReportTable.from_index(PreparedCache(tmp_path), ["impression"])
    assert reports.get("a") == "Normal." and reports.study_ids_with_text() == ["a"]
    with pytest.raises(
        TableError, match=r"index.parquet: lacks the columns \['findings'\].*data.report_columns"
    ):
        ReportTable.from_index(PreparedCache(tmp_path), ["findings"])


def test_missing_table_and_id_column_name_the_fix(tmp_path: Path):
    with pytest.raises(TableError, match=r"absent\.csv: does not exist"):
        ReportTable.read(tmp_path / "absent.csv", ["findings"])
    csv = tmp_path / "r.csv"
    csv.write_text("name,findings\na,b\n")
    with pytest.raises(TableError, match=r"has no study_id column.*data\.id_column"):
        ReportTable.read(csv, ["findings"])
