"""DICOM reading on the real GE series, CT_small.dcm and the Enhanced CT, checked against pydicom directly.

Bad series are made in tmp_path from the real files: other modality, extra series, gaps,
uneven steps, duplicates, truncation, and compressed copies (RLE, JPEG-LS, JPEG 2000).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_label, read_volume


@pytest.fixture(scope="module")
def series_dir(shared_data: Path) -> Path:
    return shared_data / "ct" / "dcmqi_ct3slice"


def _reference_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU [i, j, k] of the axial GE series built with pydicom alone (axial, so z orders the slices)."""
    datasets = sorted(
        (pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2])
    )
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    return hu.transpose(2, 1, 0), datasets


def _copy_series(series_dir: Path, dest: Path) -> list[Path]:
    dest.mkdir()
    return [Path(shutil.copy(f, dest / f.name)) for f in sorted(series_dir.glob("*.dcm"))]


def _extended_series(series_dir: Path, dest: Path, heights: list[float]) -> None:
    """A series whose slices (copies of a real one) sit at the given z positions (LPS mm)."""
    dest.mkdir()
    template = pydicom.dcmread(series_dir / "01.dcm")
    for n, z in enumerate(heights):
        template.ImagePositionPatient = [
            template.ImagePositionPatient[0],
            template.ImagePositionPatient[1],
            z,
        ]
        template.SOPInstanceUID = generate_uid()
        template.InstanceNumber = n + 1
        template.save_as(dest / f"slice{n:02d}.dcm")


def test_ge_series_matches_pydicom(series_dir: Path) -> None:
    volume = read_volume(series_dir)  # the folder also holds NRRD and licence files: ignored
    expected, datasets = _reference_series(series_dir)

    assert volume.array.shape == (512, 512, 3)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, expected)
    assert (volume.array.min(), volume.array.max()) == (int(expected.min()), int(expected.max()))
    assert volume.array.min() == -3024
    np.testing.assert_allclose(volume.spacing, (0.810547, 0.810547, 1.0), atol=1e-5)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    # Voxel (i, j, k) lies at IPP_k + i * column spacing * row direction + j * row spacing * column direction.
    for i, j, k in [(0, 0, 0), (100, 300, 2), (511, 7, 1)]:
        ds = datasets[k]
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        lps = (
            np.asarray(ds.ImagePositionPatient, dtype=float)
            + i * float(ds.PixelSpacing[1]) * iop[:3]
            + j * float(ds.PixelSpacing[0]) * iop[3:]
        )
        np.testing.assert_allclose((volume.affine @ [i, j, k, 1])[:3], lps * [-1, -1, 1], atol=1e-4)
    assert volume.meta["modality"] == "CT" and volume.meta["n_slices"] == 3
    assert volume.meta["series_uid"] == datasets[0].SeriesInstanceUID


def test_nrrd_labels_line_up_with_the_series(series_dir: Path) -> None:
    volume = read_volume(series_dir)
    liver_spine = read_label(series_dir / "liver_spine_seg.nrrd")
    heart = read_label(series_dir / "heart_seg.nrrd")
    np.testing.assert_allclose(liver_spine.affine, volume.affine, atol=1e-3)
    np.testing.assert_allclose(heart.affine, volume.affine, atol=1e-3)
    liver = volume.array[liver_spine.array == 1].mean()
    spine = volume.array[liver_spine.array == 2].mean()
    blood = volume.array[heart.array == 3].mean()
    assert 0 < liver < 100, liver  # soft tissue
    assert spine > 150, spine  # bone
    assert -200 < blood < 100, blood  # hand-drawn heart: blood and epicardial fat, neither air nor bone


def test_ct_small_single_slice(shared_data: Path) -> None:
    path = shared_data / "ct" / "pydicom" / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.array.shape == (128, 128, 1)
    np.testing.assert_array_equal(volume.array[:, :, 0], (ds.pixel_array.astype(np.int32) - 1024).T)
    np.testing.assert_allclose(volume.spacing, (0.661468, 0.661468, float(ds.SliceThickness)), atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 3], np.asarray(ds.ImagePositionPatient, float) * [-1, -1, 1])


def test_enhanced_ct_frames_from_functional_groups(shared_data: Path) -> None:
    path = shared_data / "ct" / "pydicom" / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array  # [frames, rows, cols]
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale = shared.PixelValueTransformationSequence[0]
    positions = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([p @ normal for p in positions])

    volume = read_volume(path)
    assert volume.meta["format"] == "dicom-enhanced"
    assert volume.array.shape == (512, 512, 2)
    for k, frame in enumerate(order):
        expected = frames[frame].astype(np.float64) * float(rescale.RescaleSlope) + float(
            rescale.RescaleIntercept
        )
        np.testing.assert_array_equal(volume.array[:, :, k], expected.T)
        np.testing.assert_allclose(
            (volume.affine @ [0, 0, k, 1])[:3], positions[frame] * [-1, -1, 1], atol=1e-4
        )
    spacing = float(shared.PixelMeasuresSequence[0].PixelSpacing[0])
    np.testing.assert_allclose(volume.spacing, (spacing, spacing, 10.0), atol=1e-5)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_series_decode_to_the_same_hu(series_dir: Path, tmp_path: Path, syntax) -> None:
    for file in _copy_series(series_dir, tmp_path / "series"):
        ds = pydicom.dcmread(file)
        ds.compress(syntax)
        ds.save_as(file)
    assert pydicom.dcmread(tmp_path / "series" / "01.dcm").file_meta.TransferSyntaxUID == syntax
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, read_volume(series_dir).array)
    assert volume.meta["transfer_syntax"] == syntax.name


def test_several_series_are_listed_and_one_can_be_picked(series_dir: Path, tmp_path: Path) -> None:
    files = _copy_series(series_dir, tmp_path / "study")
    other = pydicom.dcmread(files[0])
    other.SeriesInstanceUID = "1.2.3.4.5"
    other.SeriesDescription = "scout"
    other.save_as(files[0])
    original_uid = pydicom.dcmread(files[1]).SeriesInstanceUID

    with pytest.raises(VolumeReadError, match=r"study: holds 2 series: .*'scout', 1 files\).*series_uid="):
        read_volume(tmp_path / "study")
    with pytest.raises(VolumeReadError, match=rf"{original_uid} \('no description', 2 files\)"):
        read_volume(tmp_path / "study")
    picked = read_volume(tmp_path / "study", series_uid=original_uid)
    assert picked.array.shape == (512, 512, 2)
    with pytest.raises(VolumeReadError, match=r"has no series 9\.9; it holds"):
        read_volume(tmp_path / "study", series_uid="9.9")


def test_non_ct_modality(series_dir: Path, tmp_path: Path) -> None:
    files = _copy_series(series_dir, tmp_path / "mr")
    for file in files:
        ds = pydicom.dcmread(file)
        ds.Modality = "MR"
        ds.save_as(file)
    with pytest.raises(VolumeReadError, match=r"01\.dcm: has modality 'MR', not CT"):
        read_volume(tmp_path / "mr")


def test_missing_slice(series_dir: Path, tmp_path: Path) -> None:
    _extended_series(series_dir, tmp_path / "gap", [-120.0, -121.0, -122.0, -124.0, -125.0])
    with pytest.raises(
        VolumeReadError,
        match=r"gap: has missing slices: a 2\.00 mm gap .* step is 1\.00 mm "
        r"\(about 1 slice\(s\) missing\)",
    ):
        read_volume(tmp_path / "gap")


def test_uneven_spacing(series_dir: Path, tmp_path: Path) -> None:
    _extended_series(series_dir, tmp_path / "uneven", [-120.0, -121.0, -122.0, -123.6, -124.6])
    with pytest.raises(
        VolumeReadError, match=r"uneven: has uneven slice spacing: steps from 1\.00 to 1\.60 mm"
    ):
        read_volume(tmp_path / "uneven")


def test_duplicate_positions(series_dir: Path, tmp_path: Path) -> None:
    _extended_series(series_dir, tmp_path / "dup", [-120.0, -121.0, -121.0, -122.0])
    with pytest.raises(VolumeReadError, match=r"dup: has two or more slices at the same position"):
        read_volume(tmp_path / "dup")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match=r"empty: holds no DICOM files"):
        read_volume(tmp_path / "empty")
    (tmp_path / "empty" / "README.txt").write_text("not an image")
    with pytest.raises(VolumeReadError, match=r"empty: holds no DICOM files"):
        read_volume(tmp_path / "empty")


def test_truncated_and_corrupt_files(series_dir: Path, tmp_path: Path) -> None:
    raw = (series_dir / "01.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) // 2])  # header intact, pixel data cut short
    with pytest.raises(
        VolumeReadError,
        match=r"cut\.dcm: is truncated or corrupt: its header declares 512\.0 KiB of voxel data "
        r"but the file holds only 254\.9 KiB",
    ):
        read_volume(tmp_path / "cut.dcm")
    (tmp_path / "noise.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    with pytest.raises(VolumeReadError, match=r"noise\.dcm: is truncated or corrupt"):
        read_volume(tmp_path / "noise.dcm")
    garbled = bytearray(raw)
    garbled[140:600] = np.random.default_rng(0).integers(0, 256, 460, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.dcm").write_bytes(bytes(garbled))
    with pytest.raises(VolumeReadError, match=r"garbled\.dcm: is truncated or corrupt"):
        read_volume(tmp_path / "garbled.dcm")
    files = _copy_series(series_dir, tmp_path / "series")
    files[1].write_bytes(raw[:400])  # a file cut inside its header, among good ones
    with pytest.raises(VolumeReadError, match=r"02\.dcm: is truncated or corrupt"):
        read_volume(tmp_path / "series")


def test_dicom_label_maps_are_refused(series_dir: Path) -> None:
    with pytest.raises(VolumeReadError, match=r"DICOM label maps .* are not supported"):
        read_label(series_dir / "01.dcm")


def test_folders_with_one_enhanced_file_or_several(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "ct" / "pydicom" / "eCT_Supplemental.dcm"
    (tmp_path / "one").mkdir()
    shutil.copy(source, tmp_path / "one" / "ect.dcm")
    np.testing.assert_array_equal(read_volume(tmp_path / "one").array, read_volume(source).array)
    shutil.copy(source, tmp_path / "one" / "ect_copy.dcm")
    with pytest.raises(
        VolumeReadError, match=r"ect\.dcm: is a multi-frame image among 2 files of one series"
    ):
        read_volume(tmp_path / "one")
