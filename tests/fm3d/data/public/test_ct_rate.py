"""CT-RATE adapter on a mirror of the Hugging Face layout, with the 1,211 real validation reports.

File names and CSV headers are the publishers' (huggingface.co/datasets/ibrahimhamamci/CT-RATE:
dataset/metadata/validation_metadata.csv's header as shipped, the label CSV's 18 columns as in
CT-CLIP's scripts/zero_shot.py). The fixed release's volume is written with SimpleITK exactly
as the dataset's own fix_metadata.py writes it (HF discussion #59), the independent reference
the first release's rewrite must match.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import SimpleITK as sitk

from fm3d.data.cache import PreparedCache
from fm3d.data.public import DatasetLayoutError
from fm3d.data.public.build import build_dataset

# The header of dataset/metadata/validation_metadata.csv as shipped, one string so it reads as the file does.
METADATA_HEADER_LINE = (
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,"
    "ReconstructionDiameter,DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,TableHeight,"
    "RotationDirection,ExposureTime,XRayTubeCurrent,Exposure,FilterType,GeneratorPower,FocalSpots,"
    "ConvolutionKernel,PatientPosition,RevolutionTime,SingleCollimationWidth,TotalCollimationWidth,TableSpeed,"
    "TableFeedPerRotation,SpiralPitchFactor,DataCollectionCenterPatient,ReconstructionTargetCenterPatient,"
    "ExposureModulationType,CTDIvol,ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,"
    "PhotometricInterpretation,Rows,Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,"
    "ZSpacing,StudyDate"
)
METADATA_HEADER = METADATA_HEADER_LINE.split(",")
LABEL_HEADER = [
    "VolumeName",
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]
REPORT_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
# Geometry of the real CT seed as a DICOM would give it: 3 mm, axial, origin in LPS.
GEOMETRY = {
    "XYSpacing": "[3.0, 3.0]",
    "ZSpacing": "3.0",
    "ImagePositionPatient": "[177.96, -11.32, 94.3]",
    "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
}


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _metadata_row(name: str, slope: str = "1", intercept: str = "-1024") -> dict[str, str]:
    return {
        "VolumeName": name,
        "RescaleSlope": slope,
        "RescaleIntercept": intercept,
        "Manufacturer": "SIEMENS",
        "Rows": "101",
        "Columns": "122",
        **GEOMETRY,
    }


def _volume_path(folder: Path, name: str) -> Path:
    split, patient, scan, _ = name.split("_")
    return folder / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name


def _label_row(name: str, positives: set[str]) -> dict[str, str]:
    return {"VolumeName": name, **{k: str(int(k in positives)) for k in LABEL_HEADER[1:]}}


@pytest.fixture
def mirror(tmp_path: Path, ct_rate_reports: Path, tiny_ct) -> Path:
    """The fixed release: 3 train and 2 validation volumes, a metadata row without volume, a stray file."""
    dataset = tmp_path / "CT-RATE" / "dataset"
    train = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz"]
    valid = ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    for name in train:
        tiny_ct(
            _volume_path(dataset / "train_fixed", name)
        )  # fixed release: int16 HU, geometry in the header
    for name in valid:
        tiny_ct(_volume_path(dataset / "valid_fixed", name))
    (dataset / "train_fixed" / "train_1" / "notes.txt").write_text("not a volume")
    _write_csv(
        dataset / "metadata" / "train_metadata.csv",
        METADATA_HEADER,
        [_metadata_row(n) for n in [*train, "train_3_a_1.nii.gz"]],
    )
    _write_csv(
        dataset / "metadata" / "validation_metadata.csv", METADATA_HEADER, [_metadata_row(n) for n in valid]
    )
    _write_csv(
        dataset / "radiology_text_reports" / "train_reports.csv",
        REPORT_HEADER,
        [
            {
                "VolumeName": "train_1_a_1.nii.gz",
                "ClinicalInformation_EN": "Not given.",
                "Technique_EN": "Non-contrast.",
                "Findings_EN": "Bilateral emphysema.",
                "Impressions_EN": "Emphysema.",
            },
            {
                "VolumeName": "train_1_a_2.nii.gz",
                "ClinicalInformation_EN": "Cough.",
                "Technique_EN": "Non-contrast.",
                "Findings_EN": "Bilateral emphysema.",
                "Impressions_EN": "Emphysema.",
            },
            {
                "VolumeName": "train_2_a_1.nii.gz",
                "ClinicalInformation_EN": "Fever.",
                "Technique_EN": "Non-contrast.",
                "Findings_EN": "Right lower lobe consolidation.",
                "Impressions_EN": "Pneumonia.",
            },
        ],
    )
    shutil.copy(ct_rate_reports, dataset / "radiology_text_reports" / "validation_reports.csv")
    _write_csv(
        dataset / "multi_abnormality_labels" / "train_predicted_labels.csv",
        LABEL_HEADER,
        [
            _label_row("train_1_a_1.nii.gz", {"Emphysema", "Arterial wall calcification"}),
            _label_row("train_1_a_2.nii.gz", {"Emphysema"}),
            _label_row("train_2_a_1.nii.gz", {"Consolidation"}),
        ],
    )
    _write_csv(
        dataset / "multi_abnormality_labels" / "valid_predicted_labels.csv",
        LABEL_HEADER,
        [_label_row("valid_1_a_1.nii.gz", {"Lung nodule"}), _label_row("valid_2_a_1.nii.gz", set())],
    )
    return tmp_path / "CT-RATE"


def test_tables_of_the_fixed_release(mirror: Path, tmp_path: Path, run_prepare) -> None:
    out = tmp_path / "out"
    result = build_dataset("ct-rate", mirror, out)

    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest["study_id"].to_list() == [
        "train_1_a_1",
        "train_1_a_2",
        "train_2_a_1",
        "valid_1_a_1",
        "valid_2_a_1",
    ]
    row = manifest.row(1, named=True)
    assert (row["patient_id"], row["scan_id"], row["split"], row["hu_source"]) == (
        "train_1",
        "train_1_a",
        "train",
        "file",
    )
    assert row["image_path"] == str(mirror / "dataset/train_fixed/train_1/train_1_a/train_1_a_2.nii.gz")
    assert manifest.filter(pl.col("study_id") == "valid_2_a_1")["split"].item() == "test"

    reports = pl.read_parquet(out / "reports.parquet")
    valid_1 = reports.filter(pl.col("study_id") == "valid_1_a_1").row(0, named=True)
    assert valid_1["findings"].startswith("Trachea, both main bronchi are open. Mediastinal main vascular")
    assert valid_1["impression"] == (
        "A few millimetric nonspecific nodules and slight recessions in the upper lobe and lower lobe "
        "of the right lung."
    )
    train_1 = reports.filter(pl.col("study_id") == "train_1_a_1").row(0, named=True)
    assert train_1["clinical_information"] is None  # CT-RATE's "Not given." placeholder
    assert train_1["technique"] == "Non-contrast."
    assert reports.height == 5  # only the studies whose volume is there, of 3 + 1,211 reports

    labels = pl.read_parquet(out / "labels.parquet")
    assert labels.columns == ["study_id", *LABEL_HEADER[1:]]
    assert labels.schema["Emphysema"] == pl.Boolean
    first = labels.filter(pl.col("study_id") == "train_1_a_1").row(0, named=True)
    assert first["Arterial wall calcification"] and first["Emphysema"] and not first["Cardiomegaly"]
    assert labels.filter(pl.col("study_id") == "valid_1_a_1")["Lung nodule"].item() is True

    splits = json.loads((out / "splits.json").read_text())
    assert splits == {
        "train": ["train_1_a_1", "train_1_a_2", "train_2_a_1"],
        "test": ["valid_1_a_1", "valid_2_a_1"],
    }
    layout = result.tables.layout
    assert layout.missing == {"volume": ["train_fixed/train_3/train_3_a/train_3_a_1.nii.gz"]}
    assert layout.unexpected == ["train_fixed/train_1/notes.txt"]

    cache = tmp_path / "cache"
    assert run_prepare(out / "manifest.parquet", cache) == 0
    prepared = PreparedCache(cache)
    assert sorted(prepared.study_ids) == sorted(manifest["study_id"].to_list())
    assert prepared.row("valid_1_a_1")["impression"] == valid_1["impression"]


def test_split_option_keeps_only_that_split(mirror: Path, tmp_path: Path) -> None:
    result = build_dataset("ct-rate", mirror, tmp_path / "out", ["test"])
    assert result.tables.manifest["study_id"].to_list() == ["valid_1_a_1", "valid_2_a_1"]
    assert pl.read_parquet(tmp_path / "out" / "labels.parquet").height == 2


def _release_roots(tmp_path: Path, ct_file: Path, intercept: float) -> dict[str, Path]:
    """The same scan as the first release ships it (blank header, raw values), as the fixed release
    does (written by fix_metadata.py's steps in SimpleITK), and blank-headed but already in HU."""
    hu = np.asanyarray(nib.load(ct_file).dataobj).astype(np.float32)
    name = "valid_7_a_1.nii.gz"
    roots = {}
    for release, folder in (("first", "valid"), ("fixed", "valid_fixed"), ("first_in_hu", "valid")):
        root = tmp_path / release
        path = root / "dataset" / folder / "valid_7" / "valid_7_a" / name
        path.parent.mkdir(parents=True)
        stored = hu if release == "first_in_hu" else hu - intercept  # raw pixel values: HU = raw + intercept
        nib.save(nib.Nifti1Image(stored, np.eye(4)), path)  # the first release's blank header
        if release == "fixed":
            image = sitk.ReadImage(str(path))
            image.SetSpacing((3.0, 3.0, 3.0))
            image.SetOrigin((177.96, -11.32, 94.3))
            row, column = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
            image.SetDirection(row + column + np.cross(row, column).tolist())
            sitk.WriteImage(sitk.Cast(image * 1.0 + intercept, sitk.sitkInt16), str(path))
        _write_csv(
            root / "dataset" / "metadata" / "validation_metadata.csv",
            METADATA_HEADER,
            [_metadata_row(name, intercept=str(intercept))],
        )
        roots[release] = root
    return roots


def test_first_and_fixed_release_give_the_same_hu(tmp_path: Path, ct_file: Path, run_prepare) -> None:
    roots = _release_roots(tmp_path, ct_file, intercept=-1024.0)
    arrays, affines = {}, {}
    for release, root in roots.items():
        out = tmp_path / f"{release}_out"
        manifest = build_dataset("ct-rate", root, out).tables.manifest
        expected = {"first": "rescaled", "fixed": "file", "first_in_hu": "file"}[release]
        assert manifest["hu_source"].to_list() == [expected]
        assert run_prepare(out / "manifest.parquet", tmp_path / f"{release}_cache") == 0
        cache = PreparedCache(tmp_path / f"{release}_cache")
        arrays[release], affines[release] = np.array(cache.image("valid_7_a_1")), cache.affine("valid_7_a_1")
    np.testing.assert_array_equal(arrays["first"], arrays["fixed"])
    np.testing.assert_array_equal(arrays["first_in_hu"], arrays["fixed"])
    np.testing.assert_allclose(affines["first"], affines["fixed"], atol=1e-4)
    # HU, not raw values: the real CT's air and its maximum survive (window -1000..1000 clips the top).
    assert arrays["fixed"].min() == -1000 and arrays["fixed"].max() == 1000


def test_not_ct_rate_names_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "dataset" / "images").mkdir(parents=True)
    with pytest.raises(
        DatasetLayoutError, match=r"dataset/train_fixed.*found dataset/ holding 1 \(images/\)"
    ):
        build_dataset("ct-rate", tmp_path, tmp_path / "out")


def test_missing_metadata_file_is_named(mirror: Path, tmp_path: Path) -> None:
    (mirror / "dataset" / "metadata" / "validation_metadata.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"validation_metadata.csv: is missing .*train_metadata.csv"):
        build_dataset("ct-rate", mirror, tmp_path / "out")


def test_renamed_report_column_is_named(mirror: Path, tmp_path: Path) -> None:
    path = mirror / "dataset" / "radiology_text_reports" / "train_reports.csv"
    path.write_text(path.read_text().replace("Findings_EN", "Findings"))
    with pytest.raises(DatasetLayoutError, match=r"no column 'Findings_EN' \(did you mean 'Findings'\?\)"):
        build_dataset("ct-rate", mirror, tmp_path / "out")
