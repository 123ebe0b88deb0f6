"""read_volume / read_label on real NIfTI and NRRD files, checked against nibabel and pynrrd directly."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_label, read_volume

LIVER, SPLEEN, AORTA = 5, 1, 52


@pytest.fixture(scope="module")
def ts_dir(shared_data: Path) -> Path:
    return shared_data / "ct" / "totalsegmentator"


def test_totalsegmentator_ct_matches_nibabel(ts_dir: Path) -> None:
    path = ts_dir / "example_ct_sm.nii.gz"
    reference = nib.load(path)
    volume = read_volume(path)

    assert volume.array.shape == reference.shape == (122, 101, 30)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, reference.get_fdata())
    np.testing.assert_allclose(volume.affine, reference.affine)
    np.testing.assert_allclose(volume.spacing, reference.header.get_zooms())
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert (volume.array.min(), volume.array.max()) == (-1100, 1207)
    assert volume.meta["source"] == str(path) and volume.meta["format"] == "nifti"


def test_totalsegmentator_label_keeps_dtype_and_values(ts_dir: Path) -> None:
    reference = nib.load(ts_dir / "example_seg.nii.gz")
    label = read_label(ts_dir / "example_seg.nii.gz")
    assert label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, np.asarray(reference.dataobj))
    np.testing.assert_allclose(label.affine, reference.affine)
    ct = nib.load(ts_dir / "example_ct_sm.nii.gz").get_fdata()
    # The labels sit on the anatomy: liver ~45 HU, lung air far below.
    assert 30 < ct[label.array == LIVER].mean() < 70


def test_nifti_scaling_and_on_disk_dtypes(tmp_path: Path, ts_dir: Path) -> None:
    hu = np.asarray(nib.load(ts_dir / "example_ct_sm.nii.gz").dataobj)[:40, :40, :5]
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    # uint16 on disk with slope/intercept, as many scanners export.
    stored = ((hu.astype(np.int32) + 1024) * 2).astype(np.uint16)
    scaled = nib.Nifti1Image(stored, affine)
    scaled.header.set_slope_inter(0.5, -1024)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    volume = read_volume(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_array_equal(volume.array, nib.load(tmp_path / "scaled.nii.gz").get_fdata())
    assert volume.array.dtype == np.int16  # whole-number HU after scaling stay exact int16
    np.testing.assert_allclose(volume.spacing, (0.7, 0.7, 2.5))

    # A fractional slope gives float HU, not silently rounded ones.
    fractional = nib.Nifti1Image(stored, affine)
    fractional.header.set_slope_inter(0.3, -1000)
    nib.save(fractional, tmp_path / "fractional.nii")
    volume = read_volume(tmp_path / "fractional.nii")
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, stored * 0.3 - 1000, rtol=1e-6, atol=1e-3)

    for dtype in (np.int32, np.int16, np.float64):
        nib.save(nib.Nifti1Image(hu.astype(dtype), affine), tmp_path / f"{np.dtype(dtype).name}.nii.gz")
        volume = read_volume(tmp_path / f"{np.dtype(dtype).name}.nii.gz")
        assert volume.array.dtype == np.int16
        np.testing.assert_array_equal(volume.array, hu)


def test_nifti_with_nan_is_refused(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeReadError, match=r"nan\.nii\.gz: has 2 NaN or infinite voxels out of 64"):
        read_volume(tmp_path / "nan.nii.gz")


def test_truncated_nifti_is_refused(tmp_path: Path, ts_dir: Path) -> None:
    raw = (ts_dir / "example_ct_sm.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeReadError, match=r"cut\.nii\.gz: is truncated or corrupt"):
        read_volume(tmp_path / "cut.nii.gz")
    # An uncompressed file cut short fails the same way.
    (tmp_path / "cut.nii").write_bytes(gzip.decompress(raw)[:100_000])
    with pytest.raises(VolumeReadError, match=r"cut\.nii: is truncated or corrupt"):
        read_volume(tmp_path / "cut.nii")


def test_other_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match=r"nowhere\.nii\.gz: does not exist"):
        read_volume(tmp_path / "nowhere.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG....")
    with pytest.raises(VolumeReadError, match=r"scan\.png: is not a format fm3d reads"):
        read_volume(tmp_path / "scan.png")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.int16), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(VolumeReadError, match=r"4d\.nii\.gz: has shape \(3, 3, 3, 2\), not a 3D volume"):
        read_volume(tmp_path / "4d.nii.gz")
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(VolumeReadError, match=r"prob\.nii\.gz: is a label map with non-integer values"):
        read_label(tmp_path / "prob.nii.gz")


def test_nrrd_label_lps_to_ras(shared_data: Path) -> None:
    path = shared_data / "ct" / "dcmqi_ct3slice" / "liver_spine_seg.nrrd"
    data, header = nrrd.read(str(path))
    label = read_label(path)
    assert header["space"] == "left-posterior-superior"
    assert label.array.dtype == np.int16
    np.testing.assert_array_equal(label.array, data)
    # Voxel (i, j, k) sits at origin + sum of directions in LPS; RAS flips x and y.
    ijk = np.array([10, 20, 2])
    lps = header["space origin"] + ijk @ header["space directions"]
    ras = label.affine @ np.append(ijk, 1.0)
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)
    assert nib.aff2axcodes(label.affine) == ("L", "P", "S")
    np.testing.assert_allclose(label.spacing, (0.810547, 0.810547, 1.0), atol=1e-6)


def test_truncated_nrrd_is_refused(tmp_path: Path, shared_data: Path) -> None:
    raw = (shared_data / "ct" / "dcmqi_ct3slice" / "liver_spine_seg.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeReadError, match=r"cut\.nrrd: is truncated or corrupt"):
        read_label(tmp_path / "cut.nrrd")


def test_series_uid_only_for_dicom(ts_dir: Path, tmp_path: Path) -> None:
    shutil.copy(ts_dir / "example_ct_sm.nii.gz", tmp_path / "ct.nii.gz")
    with pytest.raises(VolumeReadError, match="series_uid was given but the file is not DICOM"):
        read_volume(tmp_path / "ct.nii.gz", series_uid="1.2.3")
