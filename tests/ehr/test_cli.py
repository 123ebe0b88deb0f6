"""`fm3d ehr tasks` and `fm3d ehr labels` end to end on the real MIMIC-IV demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

from ehr.cli import main
from ehr.labels import read_label_description

EXAMPLE_PHENOTYPES = Path(__file__).resolve().parents[2] / "conf" / "ehr" / "phenotypes_example.yaml"


def test_tasks_command_prints_selection(shared_data, capsys, tmp_path):
    meds = shared_data / "ehr" / "mimic_iv_demo_meds"
    out = tmp_path / "tasks.txt"
    assert main(["tasks", "--meds", str(meds), "-k", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    codes = out.read_text().split()
    assert len(codes) == 5 and all(code in printed for code in codes)


def test_labels_command_through_fm3d_dispatch(shared_data, tmp_path):
    meds = shared_data / "ehr" / "mimic_iv_demo_meds"
    studies = (
        pl.scan_parquet(meds / "data" / "*" / "*.parquet")
        .filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//"))
        .select(patient="subject_id", study_time="time")
        .unique()
        .sort("patient", "study_time")
        .with_columns(study_id=pl.format("adm{}", pl.int_range(pl.len())))
        .collect()
    )
    studies = pl.concat(
        [studies, studies.head(1).with_columns(patient=pl.lit(1, pl.Int64), study_id=pl.lit("ghost"))]
    )
    studies_csv = tmp_path / "studies.csv"
    studies.write_csv(studies_csv)
    out = tmp_path / "labels.parquet"
    command = [
        sys.executable, "-m", "fm3d.cli", "ehr", "labels", "--meds", str(meds), "--studies", str(studies_csv),
        "--out", str(out), "--tasks", "MEDS_DEATH,HOSPITAL_DISCHARGE//HOME", "--subject-column", "patient",
        "--phenotypes", str(EXAMPLE_PHENOTYPES), "--window-days", "180", "7",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "unknown subject: 1" in result.stdout and "| MEDS_DEATH |" in result.stdout
    labels = pl.read_parquet(out)
    assert labels.height == 276 and labels["has_ehr"].sum() == 275
    description = read_label_description(out)
    assert description["window_days"] == [180.0, 7.0]
    assert json.loads((tmp_path / "labels.parquet.json").read_text())["tasks"] == [
        "MEDS_DEATH",
        "HOSPITAL_DISCHARGE//HOME",
    ]


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["tasks", "--meds", str(tmp_path)]) == 1
    assert "has no data/ folder" in capsys.readouterr().err
