"""Merlin adapter on a mirror of the Stanford AIMI release, its volumes resaved from the real CT.

File names are those of github.com/StanfordMIMI/Merlin documentation/download.md. reports_final.xlsx
has the columns damo-radar's ckpt/transform_report_to_json.py reads (study id, Findings, Split,
Few Shot) and is written by xlsxwriter (polars.write_excel), a library other than the reader's.
The CSVs' `study_id` and the 30 finding names follow third-party code. The five-year task's disease
columns are not published; the names here are the test's own, and only `merlin_split` is the
publisher's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from fm3d.data.cache import PreparedCache
from fm3d.data.public import DatasetLayoutError
from fm3d.data.public.build import build_dataset
from fm3d.data.public.cli import main
from fm3d.data.public.merlin import ZERO_SHOT_FINDINGS

STEATOSIS_REPORT = (
    "Lower thorax: Normal. Liver and biliary tree: Diffuse hepatic steatosis. Gallbladder: Normal. "
    "Spleen: Normal. Pancreas: Normal. Kidneys and ureters: Normal. No free fluid.\n"
    "IMPRESSION: 1. Hepatic steatosis. 2. No acute intraabdominal findings."
)
PRELIMINARY_READ = "No acute intraabdominal findings."
EFFUSION_REPORT = "Lower thorax: Small right pleural effusion. No free air. Musculoskeletal: Normal."
FRACTURE_REPORT = "Musculoskeletal: Acute L1 compression fracture. No ascites. IMPRESSION: L1 fracture."
# study id -> (Split, Few Shot, Findings); AC4214dbd is listed twice (a preliminary, then the final read).
REPORT_ROWS = [
    ("AC4214dbd", "train", "False", PRELIMINARY_READ),
    ("AC4214dbd", "train", "True", STEATOSIS_REPORT),
    ("AC4240fff", "val", "False", EFFUSION_REPORT),
    ("AC4242a2f", "test", "False", FRACTURE_REPORT),
    ("AC4242a55", "test", "False", "Normal abdomen."),  # its volume is not downloaded
    ("AC42136cb", "holdout", "False", "Normal abdomen."),  # a split value the release does not use
]
# study_id -> findings coded 1 (positive) and 0 (negated); every other finding is -1 (not mentioned).
ZERO_SHOT = {
    "AC4214dbd": ({"hepatic_steatosis"}, {"ascites"}),
    "AC4240fff": ({"pleural_effusion"}, {"free_air"}),
    "AC4242a2f": ({"fracture"}, {"ascites"}),
    "AC4242a55": (set(), {"fracture"}),
}
METADATA_HEADER = [
    "study_id", "age", "gender", "race", "phase", "manufacturer", "manufacturermodelname", "kvp",
    "slicethickness", "xraytubecurrent",
]  # fmt: skip


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _coded(study_id: str) -> list[str]:
    positive, negative = ZERO_SHOT[study_id]
    return ["1" if f in positive else "0" if f in negative else "-1" for f in ZERO_SHOT_FINDINGS]


def _reports_xlsx(path: Path, rows: list[tuple[str, str, str, str]], split_header: str = "Split") -> None:
    columns = list(zip(*rows, strict=True))
    pl.DataFrame(
        {
            "study id": columns[0],
            split_header: columns[1],
            "Few Shot": [value == "True" for value in columns[2]],
            "Findings": columns[3],
        }
    ).write_excel(path)


@pytest.fixture
def mirror(tmp_path: Path, ct_file: Path, tiny_ct) -> Path:
    """The folder holding merlinabdominalctdataset/: three volumes (one .nii), one listed but absent,
    an unlisted volume and a stray file, the xlsx and the three CSVs."""
    release = tmp_path / "download" / "merlinabdominalctdataset"
    volumes = release / "merlin_data"
    volumes.mkdir(parents=True)
    ct = nib.load(ct_file)
    for name in ("AC4214dbd.nii.gz", "AC4240fff.nii", "AC4242a2f.nii.gz"):
        nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj), ct.affine, ct.header), volumes / name)
    tiny_ct(volumes / "AC9999999.nii.gz")
    (volumes / "checksums.txt").write_text("not a volume")
    _reports_xlsx(release / "reports_final.xlsx", REPORT_ROWS)
    _write_csv(
        release / "zero_shot_findings_disease_cls.csv",
        ["study_id", *ZERO_SHOT_FINDINGS],
        [[study_id, *_coded(study_id)] for study_id in ZERO_SHOT],
    )
    _write_csv(
        release / "five_years_disease_task.csv",
        ["study_id", "ckd", "osteoporosis", "ihd", "followup_days", "merlin_split"],
        [
            ["AC4242a2f", "1", "0", "-1", "812", "train"],
            ["AC4242a55", "0", "0", "1", "1530", "test"],
        ],
    )
    rows = [
        "AC4214dbd,54,F,White,portal venous,GE MEDICAL SYSTEMS,Revolution,120,1.25,300",
        "AC4240fff,71,M,Asian,non-contrast,SIEMENS,SOMATOM Force,100,2.5,250",
        "AC4240fff,71,M,Asian,non-contrast,SIEMENS,SOMATOM Force,100,2.5,250",  # the release repeats a few
    ]
    _write_csv(release / "metadata.csv", METADATA_HEADER, [row.split(",") for row in rows])
    return tmp_path / "download"


def test_tables_from_the_release(mirror: Path, tmp_path: Path, run_prepare) -> None:
    out = tmp_path / "out"
    result = build_dataset("merlin", mirror, out)
    volumes = mirror / "merlinabdominalctdataset" / "merlin_data"

    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest["study_id"].to_list() == ["AC4214dbd", "AC4240fff", "AC4242a2f"]
    assert manifest["split"].to_list() == ["train", "val", "test"]
    assert manifest["patient_id"].to_list() == manifest["study_id"].to_list()
    assert manifest["image_path"].to_list() == [
        str(volumes / "AC4214dbd.nii.gz"),
        str(volumes / "AC4240fff.nii"),
        str(volumes / "AC4242a2f.nii.gz"),
    ]
    assert manifest["few_shot"].to_list() == [True, False, False]
    first = manifest.row(0, named=True)
    # The final read (the longer row) is kept; the text is cut at IMPRESSION: as damo-radar does.
    assert first["findings"] == STEATOSIS_REPORT.split("\nIMPRESSION:")[0]
    assert first["impression"] == "1. Hepatic steatosis. 2. No acute intraabdominal findings."
    assert (first["age"], first["phase"], first["kvp"]) == ("54", "portal venous", "120")
    second = manifest.row(1, named=True)
    assert (second["findings"], second["impression"], second["manufacturer"]) == (
        EFFUSION_REPORT,
        None,
        "SIEMENS",
    )
    assert manifest.row(2, named=True)["age"] is None  # no metadata row

    reports = pl.read_parquet(out / "reports.parquet")
    assert reports.columns == ["study_id", "findings", "impression"]
    assert reports.row(2) == (
        "AC4242a2f",
        "Musculoskeletal: Acute L1 compression fracture. No ascites.",
        "L1 fracture.",
    )

    labels = pl.read_parquet(out / "labels.parquet")
    assert labels.columns == ["study_id", *ZERO_SHOT_FINDINGS]
    assert all(labels.schema[name] == pl.Boolean for name in ZERO_SHOT_FINDINGS)
    row = labels.row(0, named=True)  # AC4214dbd: steatosis 1, ascites 0, fracture -1
    assert (row["hepatic_steatosis"], row["ascites"], row["fracture"]) == (True, False, None)
    row = labels.row(2, named=True)  # AC4242a2f: fracture 1, ascites 0, pleural_effusion -1
    assert (row["fracture"], row["ascites"], row["pleural_effusion"]) == (True, False, None)
    assert labels["study_id"].to_list() == manifest["study_id"].to_list()
    assert labels.null_count().row(0)[1:].count(3) == 25  # all but the 5 findings coded 1/0 above

    assert json.loads((out / "splits.json").read_text()) == {
        "train": ["AC4214dbd"],
        "val": ["AC4240fff"],
        "test": ["AC4242a2f"],
    }
    five_year = pl.read_parquet(out / "five_year_labels.parquet")
    assert five_year.to_dicts() == [
        {"study_id": "AC4242a2f", "split": "train", "ckd": True, "osteoporosis": False, "ihd": None}
    ]
    assert json.loads((out / "five_year_splits.json").read_text()) == {"train": ["AC4242a2f"]}

    layout = result.tables.layout
    assert layout.missing == {"volume": ["merlin_data/AC4242a55.nii.gz"]}
    assert layout.unexpected == ["merlin_data/AC9999999.nii.gz", "merlin_data/checksums.txt"]
    assert layout.skipped == {
        "Split not one of ['test', 'train', 'val', 'valid', 'validation']": ["AC42136cb"]
    }
    notes = "\n".join(layout.notes)
    assert "study ids listed more than once, the longest text kept: 1 (AC4214dbd)" in notes
    assert "metadata.csv: 1 repeated study id rows" in notes
    assert "column 'followup_days' is not coded 1/0/-1 (values: 2 (812, 1530)); not read" in notes

    cache = tmp_path / "cache"
    assert run_prepare(out / "manifest.parquet", cache) == 0
    prepared = PreparedCache(cache)
    assert sorted(prepared.study_ids) == ["AC4214dbd", "AC4240fff", "AC4242a2f"]
    assert prepared.row("AC4242a2f")["impression"] == "L1 fracture."
    np.testing.assert_allclose(prepared.spacing("AC4240fff"), (3.0, 3.0, 3.0))


def test_split_option_and_a_differently_spelled_id_column(mirror: Path, tmp_path: Path) -> None:
    release = mirror / "merlinabdominalctdataset"
    _write_csv(release / "metadata.csv", ["Study ID", "age", "status"], [["AC4242a2f", "66", "inpatient"]])
    out = tmp_path / "out"
    (out).mkdir()
    (out / "five_year_labels.parquet").write_bytes(b"from an earlier run")

    tables = build_dataset("merlin", release, out, splits=["train"]).tables

    assert tables.manifest["study_id"].to_list() == ["AC4214dbd"]
    assert tables.layout.skipped["split not in --split"] == ["AC4240fff", "AC4242a2f", "AC4242a55"]
    assert tables.layout.missing == {}
    assert "metadata.csv: no column 'study_id'; read 'Study ID' as it" in tables.layout.notes
    assert "metadata.csv: columns left out, fm3d writes its own: status" in tables.layout.notes
    assert tables.labels is not None and tables.labels["study_id"].to_list() == ["AC4214dbd"]
    # The five-year task's studies are all test studies, so nothing is written and no stale file stays.
    assert not (out / "five_year_labels.parquet").exists()


def test_renamed_split_column_names_the_expected_and_nearest(mirror: Path, tmp_path: Path) -> None:
    release = mirror / "merlinabdominalctdataset"
    _reports_xlsx(release / "reports_final.xlsx", REPORT_ROWS[:2], split_header="Splits")
    with pytest.raises(
        DatasetLayoutError, match=r"reports_final.xlsx: has no column 'Split' \(did you mean 'Splits'"
    ):
        build_dataset("merlin", mirror, tmp_path / "out")


def test_missing_reports_file_is_named(tmp_path: Path, tiny_ct, capsys) -> None:
    release = tmp_path / "merlinabdominalctdataset"
    tiny_ct(release / "merlin_data" / "AC4214dbd.nii.gz")
    with pytest.raises(
        DatasetLayoutError,
        match=r"reports_final.xlsx: is missing.*merlinabdominalctdataset/ holding 1 \(merlin_data/\)",
    ):
        build_dataset("merlin", release, tmp_path / "out")

    assert (
        main(["manifest", "merlin", "--root", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "o")]) == 2
    )
    assert main(["manifest", "merlin", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("fm3d datasets: ") for line in err)
    assert "reports_final.xlsx: is missing" in err[1]
