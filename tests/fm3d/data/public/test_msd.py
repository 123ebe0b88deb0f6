"""MSD (Task09_Spleen) and AMOS adapters on mirrors of their dataset.json layouts.

dataset.json as the publishers ship it: MSD's keys (name, modality, labels, numTraining,
numTest, training [{image, label}], test [paths]) and AMOS's added validation list and 15 labels
(amos22.zip's dataset.json, its "arota" spelling included). The spleen volume is the real CT with
TotalSegmentator's spleen (value 1) as the label map.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from fm3d.data.cache import PreparedCache
from fm3d.data.public import DatasetLayoutError
from fm3d.data.public.build import build_dataset

AMOS_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gall bladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "arota",
    "9": "postcava",
    "10": "pancreas",
    "11": "right adrenal gland",
    "12": "left adrenal gland",
    "13": "duodenum",
    "14": "bladder",
    "15": "prostate/uterus",
}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


@pytest.fixture
def spleen(tmp_path: Path, ct_file: Path, seg_file: Path) -> Path:
    """Task09_Spleen: spleen_2 labelled, spleen_8 listed but its label absent, spleen_1 a test image."""
    root = tmp_path / "Task09_Spleen"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    seg = nib.load(seg_file)
    nib.save(
        nib.Nifti1Image((np.asanyarray(seg.dataobj) == 1).astype(np.uint8), seg.affine),
        root / "labelsTr" / "spleen_2.nii.gz",
    )
    for name in ("imagesTr/spleen_2.nii.gz", "imagesTr/spleen_8.nii.gz", "imagesTs/spleen_1.nii.gz"):
        (root / name).write_bytes(ct_file.read_bytes())
    (root / "imagesTr" / "._spleen_2.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    _write_json(
        root / "dataset.json",
        {
            "name": "Spleen",
            "description": "Spleen Segmentation",
            "reference": "Memorial Sloan Kettering Cancer Center",
            "licence": "CC-BY-SA 4.0",
            "release": "1.0 06/08/2018",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "spleen"},
            "numTraining": 2,
            "numTest": 1,
            "training": [
                {"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"},
                {"image": "./imagesTr/spleen_8.nii.gz", "label": "./labelsTr/spleen_8.nii.gz"},
            ],
            "test": ["./imagesTs/spleen_1.nii.gz"],
        },
    )
    return root


def test_msd_task(spleen: Path, tmp_path: Path, run_prepare) -> None:
    out = tmp_path / "out"
    result = build_dataset("msd", spleen, out)
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest.select("study_id", "split").rows() == [("spleen_2", "train"), ("spleen_1", "predict")]
    assert manifest["label_path"].to_list() == [str(spleen / "labelsTr" / "spleen_2.nii.gz"), None]
    assert json.loads((out / "labels.json").read_text()) == {"1": "spleen"}
    assert json.loads((out / "splits.json").read_text()) == {"train": ["spleen_2"], "predict": ["spleen_1"]}
    layout = result.tables.layout
    assert layout.missing == {"label map": ["labelsTr/spleen_8.nii.gz"]}
    assert layout.unexpected == ["imagesTr/._spleen_2.nii.gz"]

    cache = tmp_path / "cache"
    assert run_prepare(out / "manifest.parquet", cache) == 0
    prepared = PreparedCache(cache)
    assert set(np.unique(prepared.label("spleen_2"))) == {0, 1}
    assert prepared.label("spleen_1") is None


def test_msd_refuses_an_mri_task(spleen: Path, tmp_path: Path) -> None:
    spec = json.loads((spleen / "dataset.json").read_text())
    spec["modality"] = {"0": "FLAIR", "1": "T1w"}
    _write_json(spleen / "dataset.json", spec)
    with pytest.raises(DatasetLayoutError, match=r"dataset.json: describes a task of modality .*FLAIR"):
        build_dataset("msd", spleen, tmp_path / "out")


def test_missing_dataset_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "root" / "imagesTr").mkdir(parents=True)
    with pytest.raises(
        DatasetLayoutError, match=r"dataset.json: is missing.*found root/ holding 1 \(imagesTr/\)"
    ):
        build_dataset("amos", tmp_path / "root", tmp_path / "out")


def test_amos_keeps_ct_and_its_splits(tmp_path: Path, tiny_ct) -> None:
    root = tmp_path / "amos22"
    names = {
        "imagesTr/amos_0001",
        "labelsTr/amos_0001",
        "imagesTr/amos_0507",
        "labelsTr/amos_0507",
        "imagesVa/amos_0008",
        "labelsVa/amos_0008",
        "imagesTs/amos_0002",
    }
    for name in names:
        tiny_ct(root / f"{name}.nii.gz")
    _write_json(
        root / "dataset.json",
        {
            "name": "AMOS",
            "modality": {"0": "CT"},
            "labels": AMOS_LABELS,
            "numTraining": 2,
            "numValidation": 1,
            "numTest": 1,
            "training": [
                {"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"},
                {"image": "./imagesTr/amos_0507.nii.gz", "label": "./labelsTr/amos_0507.nii.gz"},
            ],
            "validation": [{"image": "./imagesVa/amos_0008.nii.gz", "label": "./labelsVa/amos_0008.nii.gz"}],
            "test": ["./imagesTs/amos_0002.nii.gz"],
        },
    )
    result = build_dataset("amos", root, tmp_path / "out", ["train", "val"])
    assert result.tables.manifest.select("study_id", "split").rows() == [
        ("amos_0001", "train"),
        ("amos_0008", "val"),
    ]
    assert result.tables.layout.skipped == {
        "MRI (AMOS ids above 500)": ["amos_0507"],
        "split not in --split": ["amos_0002"],
    }
    names = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert (len(names), names["1"], names["15"]) == (15, "spleen", "prostate/uterus")
