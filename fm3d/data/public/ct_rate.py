"""CT-RATE (chest CT + reports + 18 abnormality labels), as shipped on Hugging Face.

Layout (huggingface.co/datasets/ibrahimhamamci/CT-RATE; CT-CLIP's scripts/data_inference_nii.py
and README read the same names)::

    dataset/{train,valid}[_fixed]/train_1/train_1_a/train_1_a_1.nii.gz   split_patient_scan_reconstruction
    dataset/radiology_text_reports/{train,validation}_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 labels
    dataset/metadata/{train,validation}_metadata.csv
        VolumeName, ..., ImagePositionPatient, ImageOrientationPatient, XYSpacing, RescaleIntercept,
        RescaleSlope, ..., ZSpacing, ...

One study per volume (a reconstruction of a scan); the patient is the name's first two parts
(train_1_a_1 -> train_1), so every reconstruction and scan of a patient shares a split.

HU, and the two releases. The first release's NIfTI headers are blank: identity affine (no
spacing, origin or direction), the stored values are the DICOM's raw pixel values, and the HU
need the metadata's RescaleSlope/RescaleIntercept (CT-CLIP applies them in its data loader; the
maintainers say the header's own slope and intercept are meaningless defaults:
github.com/ibrahimethemhamamci/CT-CLIP/issues/28, HF discussion #58). The fixed release
(`*_fixed` folders, written by the dataset's fix_metadata.py, HF discussion #59) stores
`raw * slope + intercept` as int16 HU with spacing, origin and direction in the header, so applying
the metadata's rescale again would shift every voxel by the intercept. Each volume is classified
from its own header: an identity affine is the first release; anything else already holds HU and
geometry and is used as it is (nibabel, and so `fm3d prepare`, applies any header scl_slope). A
first-release volume is rewritten under OUT/volumes as the fixed release would have it (the same
geometry from the metadata, HU as int16), since `fm3d prepare` reads geometry and HU from the file;
whether its values still need the rescale is checked against the data: a chest CT holds both air
(-1100..-900 HU) and soft tissue (-200..200 HU), and a shift by the intercept (about 1000 HU)
moves one band onto the other or out of both, so the candidate (values as stored, or rescaled)
holding more of its smaller band is taken, and values already in HU are never shifted twice.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Collection
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from fm3d.data.public.files import as_flags, for_manifest, nifti_stem, read_text_table, write_nifti
from fm3d.data.public.registry import (
    DatasetAdapter,
    DatasetLayoutError,
    DatasetTables,
    LayoutReport,
    describe_folder,
    register_dataset,
)

logger = logging.getLogger(__name__)

# Publisher split name -> (volume folder stem, metadata/report file prefix, label file prefix, fm3d split).
# CT-RATE has no test split: its validation set is the held-out set CT-CLIP and its successors report on.
SPLITS: dict[str, tuple[str, str, str, str]] = {
    "train": ("train", "train", "train", "train"),
    "valid": ("valid", "validation", "valid", "test"),
}
# The 18 multi-abnormality labels, in the CSV's order (CT-CLIP scripts/zero_shot.py `pathologies`).
LABELS: tuple[str, ...] = (
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
)
# Report CSV column -> fm3d report column (the data module's default report_columns are findings, impression).
REPORT_COLUMNS: dict[str, str] = {
    "ClinicalInformation_EN": "clinical_information",
    "Technique_EN": "technique",
    "Findings_EN": "findings",
    "Impressions_EN": "impression",
}
# CT-RATE's placeholder for an empty section; CT-CLIP drops it too.
NOT_GIVEN = "Not given."
METADATA_COLUMNS = (
    "VolumeName",
    "XYSpacing",
    "ZSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
)
VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii\.gz$")
# Bands every chest CT fills: air (lungs, outside the body) and soft tissue (fat to blood and organs).
HU_BANDS = ((-1100.0, -900.0), (-200.0, 200.0))
MIN_BAND_SHARE = 0.01
VOLUMES_DIR = "volumes"


@register_dataset("ct-rate")
class CtRate(DatasetAdapter):
    """CT-RATE: volumes, reports, the 18 abnormality labels and the official train/validation split."""

    title = "CT-RATE: non-contrast chest CT with radiology reports"
    writes = "manifest, reports (findings, impression, ...), labels (18 abnormalities), splits"
    source = "https://huggingface.co/datasets/ibrahimhamamci/CT-RATE (gated: accept the terms)"
    licence = "CC BY-NC-SA 4.0 (research use; no redistribution)"

    def read(self, root: Path, out: Path, splits: Collection[str] | None = None) -> DatasetTables:
        dataset = root / "dataset" if (root / "dataset").is_dir() else root
        folders = {split: _volume_folder(dataset, split) for split in SPLITS}
        if not any(folders.values()):
            raise DatasetLayoutError(
                dataset,
                "holds no CT-RATE volume folder (expected dataset/train_fixed, dataset/valid_fixed, or the "
                f"first release's dataset/train, dataset/valid; found {describe_folder(dataset)})",
                "pass the folder the CT-RATE download unpacked into (the one holding dataset/) as --root",
            )
        layout = LayoutReport()
        rows: list[dict[str, object]] = []
        reports, labels = [], []
        for split, folder in folders.items():
            if folder is None:
                continue
            _, tables, label_prefix, fm3d_split = SPLITS[split]
            if splits is not None and fm3d_split not in splits:
                layout.notes.append(f"{folder.name}/ left out: its split ({fm3d_split}) is not in --split")
                continue
            metadata = _metadata(dataset / "metadata" / f"{tables}_metadata.csv")
            volumes = _volumes(folder, split, layout)
            for name in sorted(set(metadata) - set(volumes)):
                layout.add_missing("volume", f"{folder.name}/{_relative(name)}")
            for name, path in sorted(volumes.items()):
                if name not in metadata:
                    layout.add_skipped(
                        "no metadata row, so its geometry and HU are unknown", nifti_stem(name)
                    )
                    continue
                row = _study(name, path, metadata[name], out, layout)
                if row is not None:
                    rows.append({**row, "split": fm3d_split})
            reports.append(
                self._reports(dataset / "radiology_text_reports" / f"{tables}_reports.csv", layout)
            )
            label_file = dataset / "multi_abnormality_labels" / f"{label_prefix}_predicted_labels.csv"
            labels.append(self._labels(label_file, layout))
        manifest = pl.DataFrame(rows, schema=_MANIFEST_SCHEMA)
        rewritten = manifest.filter(~pl.col("image_path").str.starts_with("/")).height
        if rewritten:
            layout.notes.append(
                f"{rewritten} first-release volumes (blank header) rewritten under {out / VOLUMES_DIR} "
                "as int16 HU with the metadata's geometry; the fixed release (*_fixed) needs no rewrite"
            )
        ids = manifest.select("study_id")
        report_table = _joined([r for r in reports if r is not None], ids)
        if report_table is not None:
            manifest = manifest.join(
                report_table.select("study_id", "findings", "impression"), "study_id", "left"
            )
        return DatasetTables(
            manifest=manifest,
            reports=report_table,
            labels=_joined([t for t in labels if t is not None], ids),
            layout=layout,
        )

    @staticmethod
    def _reports(path: Path, layout: LayoutReport) -> pl.DataFrame | None:
        if not path.is_file():
            layout.add_missing("table", f"radiology_text_reports/{path.name}")
            return None
        table = read_text_table(path, ["VolumeName", "Findings_EN", "Impressions_EN"])
        present = [c for c in REPORT_COLUMNS if c in table.columns]
        return table.select(
            pl.col("VolumeName").map_elements(nifti_stem, return_dtype=pl.String).alias("study_id"),
            *[
                pl.when(pl.col(c).str.strip_chars().is_in(["", NOT_GIVEN]))
                .then(None)
                .otherwise(pl.col(c))
                .alias(REPORT_COLUMNS[c])
                for c in present
            ],
        )

    @staticmethod
    def _labels(path: Path, layout: LayoutReport) -> pl.DataFrame | None:
        if not path.is_file():
            layout.add_missing("table", f"multi_abnormality_labels/{path.name}")
            return None
        table = read_text_table(path, ["VolumeName", *LABELS])
        return table.select(
            pl.col("VolumeName").map_elements(nifti_stem, return_dtype=pl.String).alias("study_id"),
            *[as_flags(table[name]) for name in LABELS],
        )


_MANIFEST_SCHEMA = {
    "study_id": pl.String,
    "patient_id": pl.String,
    "scan_id": pl.String,
    "image_path": pl.String,
    "hu_source": pl.String,
    "rescale_slope": pl.Float64,
    "rescale_intercept": pl.Float64,
    "split": pl.String,
}


def _volume_folder(dataset: Path, split: str) -> Path | None:
    """The split's volume folder, the fixed release's preferred when both are there."""
    for name in (f"{split}_fixed", split):
        if (dataset / name).is_dir():
            return dataset / name
    return None


def _relative(name: str) -> str:
    """Where a volume lies inside its split folder: train_1/train_1_a/train_1_a_1.nii.gz."""
    stem = nifti_stem(name)
    scan = stem.rsplit("_", 1)[0]
    return f"{scan.rsplit('_', 1)[0]}/{scan}/{name}"


def _volumes(folder: Path, split: str, layout: LayoutReport) -> dict[str, Path]:
    """Volume file name -> path of every volume in its place; anything else is listed as unexpected."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        match = VOLUME_NAME.match(path.name)
        if match and match.group(1) == split and path.relative_to(folder).as_posix() == _relative(path.name):
            found[path.name] = path
        else:
            layout.unexpected.append(path.relative_to(folder.parent).as_posix())
    return found


def _metadata(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise DatasetLayoutError(
            path,
            f"is missing (found {describe_folder(path.parent)}); without it the first release's volumes "
            "have no geometry or HU and the fixed release's cannot be told from them",
            "download dataset/metadata/ from the CT-RATE repository too",
        )
    table = read_text_table(path, METADATA_COLUMNS)
    return {row["VolumeName"]: row for row in table.iter_rows(named=True)}


def _study(
    name: str, path: Path, meta: dict[str, str], out: Path, layout: LayoutReport
) -> dict[str, object] | None:
    """The manifest row of one volume, rewriting a first-release volume into HU with its geometry."""
    stem = nifti_stem(name)
    scan = stem.rsplit("_", 1)[0]
    try:
        slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
    except ValueError:
        layout.add_skipped("metadata RescaleSlope/RescaleIntercept are not numbers", stem)
        return None
    row = {
        "study_id": stem,
        "patient_id": scan.rsplit("_", 1)[0],
        "scan_id": scan,
        "rescale_slope": slope,
        "rescale_intercept": intercept,
    }
    image = nib.load(path)
    if not _blank_header(image):
        return {**row, "image_path": str(path.resolve()), "hu_source": "file"}
    try:
        affine = metadata_affine(meta)
    except (ValueError, SyntaxError) as exc:
        layout.add_skipped(f"metadata geometry cannot be read ({exc})", stem)
        return None
    hu, source = _first_release_hu(np.asanyarray(image.dataobj), slope, intercept)
    if hu is None:
        layout.add_skipped("neither stored nor rescaled values look like CT HU (air and soft tissue)", stem)
        return None
    target = out / VOLUMES_DIR / name
    write_nifti(target, hu, affine)
    return {**row, "image_path": for_manifest(target, out), "hu_source": source}


def _blank_header(image: nib.Nifti1Image) -> bool:
    """The first release's header: an identity affine (no spacing, origin or direction)."""
    return bool(np.allclose(image.affine, np.eye(4)))


def metadata_affine(meta: dict[str, str]) -> np.ndarray:
    """The RAS affine of a volume from its metadata row, as the dataset's fix_metadata.py sets it.

    That script (HF discussion #59) gives the NIfTI's first axis the direction of
    ImageOrientationPatient's row cosine, the second its column cosine, the third their cross
    product, with XYSpacing, ZSpacing and ImagePositionPatient as origin, all in DICOM's LPS;
    NIfTI is RAS, so x and y change sign.
    """
    x_mm, y_mm = (float(v) for v in ast.literal_eval(meta["XYSpacing"]))
    z_mm = float(meta["ZSpacing"])
    orientation = [float(v) for v in ast.literal_eval(meta["ImageOrientationPatient"])]
    origin = [float(v) for v in ast.literal_eval(meta["ImagePositionPatient"])]
    row, column = np.array(orientation[:3]), np.array(orientation[3:6])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * x_mm, column * y_mm, np.cross(row, column) * z_mm
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _first_release_hu(values: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray | None, str]:
    """int16 HU of a first-release volume, and "rescaled" or "file": whether the rescale was applied."""
    values = np.asarray(values, dtype=np.float64)
    candidates = {"rescaled": values * slope + intercept, "file": values}
    scores = {
        key: min(float(np.mean((v >= lo) & (v <= hi))) for lo, hi in HU_BANDS)
        for key, v in candidates.items()
    }
    best = max(scores, key=scores.get) if slope != 1.0 or intercept != 0.0 else "file"
    if scores[best] < MIN_BAND_SHARE:
        return None, best
    info = np.iinfo(np.int16)
    return np.clip(np.rint(candidates[best]), info.min, info.max).astype(np.int16), best


def _joined(tables: list[pl.DataFrame], ids: pl.DataFrame) -> pl.DataFrame | None:
    """The splits' tables stacked and kept to the manifest's studies, in its order."""
    if not tables:
        return None
    stacked = pl.concat(tables, how="diagonal_relaxed").unique("study_id", keep="first", maintain_order=True)
    return ids.join(stacked, "study_id", "inner", maintain_order="left")
