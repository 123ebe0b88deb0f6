"""TotalSegmentator v2 (1,228 CTs, 117 structures), as shipped on Zenodo.

Layout (Totalsegmentator_dataset_v201.zip, zenodo.org/records/10047292; the same names are read by
the TotalSegmentator repository's training code)::

    meta.csv                              semicolon-separated, UTF-8 with BOM:
                                          image_id;age;gender;institute;study_type;split;manufacturer;...
    s0000/ct.nii.gz                       int16 HU
    s0000/segmentations/<structure>.nii.gz   one binary mask per structure, 117 of them

The 117 masks of a subject are merged into one uint8 label map (OUT/labels/<image_id>.nii.gz, on
the CT's grid) whose values follow TotalSegmentator's own v2 class table ("total" in
totalsegmentator/map_to_binary.py: 1 spleen, 2 kidney_right, ... 117 costal_cartilages), written
beside the manifest as labels.json, so label values mean the same as in TotalSegmentator's model
output. Where masks overlap (rare, at boundaries) the structure earlier in the table keeps the voxel.
A subject missing any mask is left out rather than merged with a structure silently background.
The official split is meta.csv's `split` (train, val, test). Subjects are separate scans with no
patient id published, so each is its own patient.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from fm3d.data.public.files import for_manifest, read_text_table, write_nifti
from fm3d.data.public.registry import (
    DatasetAdapter,
    DatasetLayoutError,
    DatasetTables,
    LayoutReport,
    describe_folder,
    register_dataset,
)

META_FILE = "meta.csv"
META_COLUMNS = ("image_id", "split")
SPLITS = {"train": "train", "val": "val", "test": "test"}
LABELS_DIR = "labels"
# TotalSegmentator v2 "total" task, value = position + 1.
STRUCTURES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
    "kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1", "vertebrae_L5", "vertebrae_L4",
    "vertebrae_L3", "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10",
    "vertebrae_T9", "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4",
    "vertebrae_T3", "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6", "vertebrae_C5",
    "vertebrae_C4", "vertebrae_C3", "vertebrae_C2", "vertebrae_C1", "heart", "aorta", "pulmonary_vein",
    "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right",
    "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left",
    "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull", "rib_left_1",
    "rib_left_2", "rib_left_3", "rib_left_4", "rib_left_5", "rib_left_6", "rib_left_7", "rib_left_8",
    "rib_left_9", "rib_left_10", "rib_left_11", "rib_left_12", "rib_right_1", "rib_right_2",
    "rib_right_3", "rib_right_4", "rib_right_5", "rib_right_6", "rib_right_7", "rib_right_8",
    "rib_right_9", "rib_right_10", "rib_right_11", "rib_right_12", "sternum", "costal_cartilages",
)  # fmt: skip
LABEL_NAMES: dict[str, str] = {str(value): name for value, name in enumerate(STRUCTURES, 1)}


@register_dataset("totalsegmentator")
class TotalSegmentator(DatasetAdapter):
    """TotalSegmentator v2: CTs, one merged 117-structure label map per subject, the official split."""

    title = "TotalSegmentator v2: 1,228 CTs with 117 segmented structures"
    writes = "manifest (+ merged uint8 label maps under OUT/labels), labels.json (117 names), splits"
    source = "https://zenodo.org/records/10047292 (Totalsegmentator_dataset_v201.zip)"
    licence = "CC BY 4.0 per the v2.0.1 Zenodo record (check the record of the version you download)"

    def read(self, root: Path, out: Path, splits: Collection[str] | None = None) -> DatasetTables:
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise DatasetLayoutError(
                meta_path,
                f"is missing, so {root} does not look like TotalSegmentator (expected meta.csv beside "
                f"s0000/ct.nii.gz, s0000/segmentations/...; found {describe_folder(root)})",
                "pass the unzipped Totalsegmentator_dataset_v201 folder as --root",
            )
        meta = read_text_table(meta_path, META_COLUMNS, separator=";")
        layout = LayoutReport()
        listed = set(meta["image_id"].to_list())
        for entry in sorted(root.iterdir()):
            if entry.name != META_FILE and entry.name not in listed:
                layout.unexpected.append(entry.name + ("/" if entry.is_dir() else ""))
        rows = []
        for subject in meta.iter_rows(named=True):
            image_id = subject["image_id"]
            split = layout.split_of(image_id, subject["split"], SPLITS, splits, "meta.csv split")
            if split is None:
                continue
            label = _merge_subject(root / image_id, out / LABELS_DIR / f"{image_id}.nii.gz", layout)
            if label is None:
                continue
            rows.append({
                "study_id": image_id,
                "patient_id": image_id,
                "image_path": str((root / image_id / "ct.nii.gz").resolve()),
                "label_path": for_manifest(label, out),
                "split": split,
                **{k: v for k, v in subject.items() if k not in ("image_id", "split")},
            })  # fmt: skip
        manifest = pl.DataFrame(rows, schema={c: pl.String for c in _columns(meta)})
        return DatasetTables(manifest=manifest, label_names=LABEL_NAMES, layout=layout)


def _columns(meta: pl.DataFrame) -> list[str]:
    extra = [c for c in meta.columns if c not in ("image_id", "split")]
    return ["study_id", "patient_id", "image_path", "label_path", "split", *extra]


def _merge_subject(folder: Path, target: Path, layout: LayoutReport) -> Path | None:
    """Merge a subject's masks into `target`; None (and the reason in `layout`) when it cannot be."""
    subject = folder.name
    ct_path, masks = folder / "ct.nii.gz", folder / "segmentations"
    if not ct_path.is_file():
        layout.add_missing("volume", f"{subject}/ct.nii.gz")
        return None
    expected = {f"{name}.nii.gz" for name in STRUCTURES}
    for entry in sorted(folder.iterdir()):
        if entry.name not in ("ct.nii.gz", "segmentations"):
            layout.unexpected.append(f"{subject}/{entry.name}")
    present = {p.name for p in masks.iterdir()} if masks.is_dir() else set()
    layout.unexpected += [f"{subject}/segmentations/{name}" for name in sorted(present - expected)]
    absent = [name for name in STRUCTURES if f"{name}.nii.gz" not in present]
    if absent:
        for name in absent:
            layout.add_missing("segmentation mask", f"{subject}/segmentations/{name}.nii.gz")
        layout.add_skipped("segmentation masks missing", subject)
        return None
    ct = nib.load(ct_path)
    merged = np.zeros(ct.shape, np.uint8)  # [X, Y, Z] of the CT file
    for value, name in enumerate(STRUCTURES, 1):
        mask = nib.load(masks / f"{name}.nii.gz")
        if mask.shape != ct.shape or not np.allclose(mask.affine, ct.affine, atol=1e-3):
            layout.add_skipped(f"a mask's grid differs from ct.nii.gz's ({name})", subject)
            return None
        merged[(np.asanyarray(mask.dataobj) > 0) & (merged == 0)] = value
    write_nifti(target, merged, ct.affine)
    return target
