"""`fm3d ehr tasks` and `fm3d ehr labels` end to end on the real MIMIC-IV demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

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
    assert main(["tasks", "--meds", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fm3d ehr tasks: {tmp_path}: has no data/ folder") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["labels", "--tasks-k", "0"], "--tasks-k must be a positive count, got 0"),
        (["labels", "--num-bins", "0"], "--num-bins must be a positive count, got 0"),
        (
            ["labels", "--window-days", "nan", "30"],
            "--window-days needs two finite numbers >= 0, got [nan, 30.0]",
        ),
        (
            ["labels", "--valid-years", "2300", "1800"],
            "valid years must be two integers MIN <= MAX, got (2300, 1800)",
        ),
        (["tasks", "-k", "-3"], "-k must be a positive count, got -3"),
        (["tasks", "--min-event-fraction", "0"], "--min-event-fraction must be in (0, 0.5), got 0.0"),
    ],
)
def test_unusable_settings_are_refused_before_any_work(tmp_path, capsys, args, message):
    """The MEDS folder does not even exist: the setting is refused before anything is read."""
    command, *options = args
    io = (
        ["--studies", str(tmp_path / "s.csv"), "--out", str(tmp_path / "out.parquet")]
        if command == "labels"
        else []
    )
    assert main([command, "--meds", str(tmp_path / "nowhere"), *io, *options]) == 2
    err = capsys.readouterr().err
    assert err == f"fm3d ehr {command}: {message}\n"
    assert not (tmp_path / "out.parquet").exists()


def _demo_studies(admission_studies, meds: Path, out: Path) -> Path:
    admission_studies(pl.scan_parquet(meds / "data" / "*" / "*.parquet")).write_csv(out)
    return out


def test_damaged_meds_is_refused_then_dropped_on_request(damaged_meds, admission_studies, tmp_path):
    """Through the real `fm3d` command: one line and exit 2 by default, a counted drop with --drop-invalid."""
    studies = _demo_studies(admission_studies, damaged_meds, tmp_path / "studies.csv")
    out = tmp_path / "labels" / "labels.parquet"
    command = [
        sys.executable, "-m", "fm3d.cli", "ehr", "labels", "--meds", str(damaged_meds),
        "--studies", str(studies), "--out", str(out), "--tasks", "MEDS_DEATH,HOSPITAL_DISCHARGE//HOME",
    ]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"fm3d ehr labels: {damaged_meds}: 5 unusable events: 3 null code")
    assert "--drop-invalid" in refused.stderr and not out.exists()

    dropped = subprocess.run([*command, "--drop-invalid"], capture_output=True, text=True, check=False)
    assert dropped.returncode == 0, dropped.stderr
    assert "dropping 5 unusable events" in dropped.stderr
    description = read_label_description(out)
    assert description["dropped_invalid_events"] == {"null code": 3, "time outside years (1800, 2300)": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.parquet", "labels.parquet.json"]


def test_a_failed_write_leaves_the_previous_labels_whole(
    shared_data, admission_studies, tmp_path, monkeypatch
):
    """`--out` is written through a temporary file: a write that dies midway never replaces the old table."""
    meds = shared_data / "ehr" / "mimic_iv_demo_meds"
    studies = _demo_studies(admission_studies, meds, tmp_path / "studies.csv")
    out = tmp_path / "labels.parquet"
    args = [
        "labels",
        "--meds",
        str(meds),
        "--studies",
        str(studies),
        "--out",
        str(out),
        "--tasks",
        "MEDS_DEATH",
    ]
    assert main(args) == 0
    before = out.read_bytes()

    def dies_midway(frame, file, **kwargs):
        Path(file).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        main(args)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "labels.parquet",
        "labels.parquet.json",
        "studies.csv",
    ]
