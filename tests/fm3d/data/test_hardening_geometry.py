"""Issue 16, class 4: geometry that cannot be trusted is an error naming the file, never a guess.

Copies of the real CT (NIfTI), the real GE series (DICOM) and its real NRRD label are given
zero, NaN, huge or missing spacing and degenerate directions; each read must fail naming the
file and what is wrong (no 1 mm substitute, no 1-voxel axis). `fm3d prepare`'s spacing, window,
worker and memory arguments are refused before any work (the manifest is not even opened).
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_label, read_volume


@pytest.fixture
def voxels(ct_file: Path) -> np.ndarray:
    return np.asarray(nib.load(ct_file).dataobj)


def _raw_nifti(path: Path, voxels: np.ndarray, sform: np.ndarray | None) -> Path:
    """A .nii written byte by byte: nibabel refuses to save affines it cannot decompose into a qform."""
    header = nib.Nifti1Header()
    header.set_data_shape(voxels.shape)
    header.set_data_dtype(voxels.dtype)
    header["pixdim"][1:4] = 0.0
    if sform is not None:
        header.set_sform(sform, code=1)
    header.set_data_offset(352)
    path.write_bytes(header.binaryblock + b"\0" * 4 + voxels.tobytes(order="F"))
    return path


@pytest.mark.parametrize(
    ("affine", "message"),
    [
        (
            np.diag([0.0, 3.0, 3.0, 1.0]),
            r"has voxel spacing \[0\.0, 3\.0, 3\.0\] mm: 0 mm is outside the plausible",
        ),
        (np.diag([3.0, 3.0, 100.0, 1.0]), r"100 mm is outside the plausible range 0\.01\.\.50\.0 mm for CT"),
        (np.diag([3.0, np.nan, 3.0, 1.0]), r"has NaN or infinite values in its voxel-to-world affine"),
        (
            np.array([[3.0, 3.0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]]),
            r"has a degenerate orientation: its axis directions are \(nearly\) parallel",
        ),
    ],
)
def test_bad_nifti_geometry_names_the_file(tmp_path: Path, voxels: np.ndarray, affine, message: str) -> None:
    path = _raw_nifti(tmp_path / "bad.nii", voxels, sform=affine)
    with pytest.raises(VolumeReadError, match=f"^{re.escape(str(path))}: .*{message}") as info:
        read_volume(path)
    assert "fm3d will not" in str(info.value) or "repair the header" in str(info.value).lower()


def test_nifti_without_any_geometry_is_refused(tmp_path: Path, voxels: np.ndarray) -> None:
    # No sform, no qform and pixdim 0: nibabel would fall back to pixdim and set the 0 mm to 1 mm.
    path = _raw_nifti(tmp_path / "bare.nii", voxels, sform=None)
    with pytest.raises(
        VolumeReadError,
        match=f"^{re.escape(str(path))}: has no orientation \\(its sform and qform codes are both 0\\)",
    ):
        read_volume(path)


def _label_nrrd(shared_data: Path, tmp_path: Path, replace: tuple[str, str]) -> Path:
    source = (shared_data / "ct" / "dcmqi_ct3slice" / "liver_spine_seg.nrrd").read_bytes()
    header, body = source.split(b"\n\n", 1)
    lines = [line for line in header.decode().splitlines() if not line.startswith(replace[0])]
    if replace[1]:
        lines.append(replace[1])
    path = tmp_path / "label.nrrd"
    path.write_bytes("\n".join(lines).encode() + b"\n\n" + body)
    return path


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("space directions", ""), r"has neither 'space directions' nor 'spacings'.*will not assume 1 mm"),
        (("space directions", "space directions: (0,0,0) (0,1,0) (0,0,1)"), r"0 mm is outside the plausible"),
        (("space directions", "space directions: (nan,0,0) (0,1,0) (0,0,1)"), r"NaN or infinite values"),
        (
            ("space directions", "space directions: (1,0,0) (1,0,0) (0,0,1)"),
            r"degenerate orientation",
        ),
    ],
)
def test_bad_nrrd_geometry_names_the_file(shared_data: Path, tmp_path: Path, replace, message: str) -> None:
    path = _label_nrrd(shared_data, tmp_path, replace)
    with pytest.raises(VolumeReadError, match=f"^{re.escape(str(path))}: .*{message}"):
        read_label(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"PixelSpacing": [0, 0]}, r"has PixelSpacing \[0\.0, 0\.0\], not two positive mm values"),
        (
            {"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]},
            r"has a degenerate ImageOrientationPatient .* perpendicular unit vectors",
        ),
        ({"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}, r"has a degenerate ImageOrientationPatient"),
    ],
)
def test_bad_dicom_geometry_names_the_file(
    dicom_series: Path, tmp_path: Path, edit: dict, message: str
) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for file in sorted(dicom_series.glob("*.dcm")):
        ds = pydicom.dcmread(file)
        if file.name == "02.dcm":
            for key, value in edit.items():
                setattr(ds, key, value)
        ds.save_as(folder / file.name)
    with pytest.raises(VolumeReadError, match=f"^{re.escape(str(folder / '02.dcm'))}: {message}"):
        read_volume(folder)


def test_single_slice_without_thickness_is_not_given_1_mm(dicom_series: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_series / "01.dcm")
    for key in ("SliceThickness", "SpacingBetweenSlices"):
        if key in ds:
            delattr(ds, key)
    ds.save_as(tmp_path / "one.dcm")
    with pytest.raises(VolumeReadError, match=r"one\.dcm: is a single slice without SliceThickness"):
        read_volume(tmp_path / "one.dcm")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--spacing", "nan", "1", "1"],
            r"--spacing / --hu-window: target_spacing_mm must be 3 finite numbers",
        ),
        (
            ["--spacing", "0", "1", "1"],
            r"target_spacing_mm must be three mm values .* got \(0\.0, 1\.0, 1\.0\)",
        ),
        (["--spacing", "-1", "1", "1"], r"target_spacing_mm must be"),
        (["--hu-window", "100", "-100"], r"hu_window must be whole HU values \(low, high\), low < high"),
        (["--hu-window", "0", "0"], r"hu_window must be"),
        (["--hu-window", "nan", "100"], r"hu_window must be 2 finite numbers"),
        (["--hu-window", "-175.5", "250"], r"hu_window must be whole HU values"),
        (["--workers", "0"], r"--workers must be at least 1, got 0"),
        (["--max-gib", "nan"], r"--max-gib must be a positive number of GiB, got nan"),
        (["--max-gib", "0"], r"--max-gib must be a positive number of GiB"),
    ],
)
def test_cli_arguments_are_refused_before_any_work(tmp_path: Path, prepare_main, flags, message: str) -> None:
    out = tmp_path / "cache"
    run = prepare_main("--manifest", tmp_path / "no_such_manifest.csv", "--out", out, *flags)
    assert run.returncode == 2
    assert run.stderr.startswith("fm3d prepare: ") and run.stderr.count("\n") == 1, run.stderr
    assert re.search(message, run.stderr), run.stderr
    assert not out.exists()


def test_cli_argument_error_from_the_real_command(tmp_path: Path, prepare_cli) -> None:
    run = prepare_cli("--manifest", tmp_path / "m.csv", "--out", tmp_path / "c", "--spacing", "nan", "1", "1")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == (
        "fm3d prepare: --spacing / --hu-window: target_spacing_mm must be 3 finite numbers, "
        "got (nan, 1.0, 1.0)\n"
    )
