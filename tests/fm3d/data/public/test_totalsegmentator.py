"""TotalSegmentator adapter on a mirror of the Zenodo v2.0.1 layout built from the real CT and its masks.

meta.csv is written as shipped (semicolon-separated, UTF-8 BOM, the v2.0.1 header); each of the
117 masks is the real label map's voxels of one class (labels_total_v2.tsv), so the merged map
must give back TotalSegmentator's own label map.
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

# meta.csv's header as shipped in v2.0.1 (semicolon-separated).
META_HEADER = (
    "image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;"
    "pathology;pathology_location"
)


def _classes(shared_data: Path) -> dict[int, str]:
    lines = (shared_data / "ct" / "totalsegmentator" / "labels_total_v2.tsv").read_text().splitlines()[1:]
    return {int(v): n for v, n in (line.split("\t") for line in lines) if int(v) > 0}


@pytest.fixture
def mirror(tmp_path: Path, shared_data: Path, ct_file: Path, seg_file: Path, tiny_ct) -> Path:
    """s0001 complete (the real CT), s0002 without its liver mask, s0003 listed but absent, a stray file."""
    root = tmp_path / "Totalsegmentator_dataset_v201"
    seg = nib.load(seg_file)
    values = np.asanyarray(seg.dataobj)
    classes = _classes(shared_data)
    (root / "s0001" / "segmentations").mkdir(parents=True)
    (root / "s0001" / "ct.nii.gz").write_bytes(ct_file.read_bytes())
    for value, name in classes.items():
        mask = (values == value).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, seg.affine), root / "s0001" / "segmentations" / f"{name}.nii.gz")
    (root / "s0001" / "preview.png").write_bytes(b"\x89PNG")
    tiny_ct(root / "s0002" / "ct.nii.gz")
    (root / "s0002" / "segmentations").mkdir()
    empty = nib.Nifti1Image(np.zeros((12, 10, 6), np.uint8), np.diag([3.0, 3.0, 3.0, 1.0]))
    for name in classes.values():
        if name != "liver":
            nib.save(empty, root / "s0002" / "segmentations" / f"{name}.nii.gz")
    rows = [
        "s0001;64;m;A;ct thorax-abdomen;train;Siemens;Somatom;120;no;",
        "s0002;70;f;B;ct abdomen;val;GE;X;100;;",
        "s0003;55;m;C;ct thorax;test;Philips;Y;120;;",
    ]
    (root / "meta.csv").write_text("\ufeff" + "\n".join([META_HEADER, *rows]) + "\n", encoding="utf-8")
    return root


def test_merged_label_map_and_tables(mirror: Path, tmp_path: Path, seg_file: Path, run_prepare) -> None:
    out = tmp_path / "out"
    result = build_dataset("totalsegmentator", mirror, out)

    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest["study_id"].to_list() == ["s0001"]
    row = manifest.row(0, named=True)
    assert (row["split"], row["label_path"], row["age"], row["study_type"]) == (
        "train",
        "labels/s0001.nii.gz",
        "64",
        "ct thorax-abdomen",
    )
    assert row["image_path"] == str(mirror / "s0001" / "ct.nii.gz")

    merged = nib.load(out / "labels" / "s0001.nii.gz")
    labels = np.asanyarray(merged.dataobj)
    assert labels.dtype == np.uint8
    np.testing.assert_allclose(merged.affine, nib.load(seg_file).affine, atol=1e-5)
    # Hand-picked voxels: liver, aorta, spleen, and air outside the body.
    assert (labels[84, 56, 18], labels[54, 47, 26], labels[20, 39, 19], labels[0, 0, 0]) == (5, 52, 1, 0)
    np.testing.assert_array_equal(labels, np.asanyarray(nib.load(seg_file).dataobj))

    names = json.loads((out / "labels.json").read_text())
    assert (names["1"], names["5"], names["52"], names["117"], len(names)) == (
        "spleen",
        "liver",
        "aorta",
        "costal_cartilages",
        117,
    )
    layout = result.tables.layout
    assert layout.missing == {
        "segmentation mask": ["s0002/segmentations/liver.nii.gz"],
        "volume": ["s0003/ct.nii.gz"],
    }
    assert layout.skipped == {"segmentation masks missing": ["s0002"]}
    assert layout.unexpected == ["s0001/preview.png"]
    assert json.loads((out / "splits.json").read_text()) == {"train": ["s0001"]}

    cache = tmp_path / "cache"
    assert run_prepare(out / "manifest.parquet", cache) == 0
    prepared = PreparedCache(cache)
    assert prepared.label("s0001") is not None and 52 in np.unique(prepared.label("s0001"))
    assert json.loads((cache / "labels.json").read_text())["52"] == "aorta"


def test_not_totalsegmentator_names_meta_csv(tmp_path: Path) -> None:
    (tmp_path / "root" / "imagesTr").mkdir(parents=True)
    with pytest.raises(
        DatasetLayoutError, match=r"meta.csv: is missing.*found root/ holding 1 \(imagesTr/\)"
    ):
        build_dataset("totalsegmentator", tmp_path / "root", tmp_path / "out")
