"""Reading CT volumes and label maps from NIfTI, NRRD and DICOM into one `Volume` type.

Every reader returns the voxels in the file's own order together with the 4x4 affine that
maps a voxel index to RAS world millimetres, so geometry never depends on guessing an axis
convention later; `fm3d.data.preprocess` turns that into fm3d's [D, H, W] canonical grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fm3d.data.errors import VolumeReadError
from fm3d.data.limits import (
    ReadLimits,
    check_array_bytes,
    check_body_size,
    check_geometry,
    require_regular_file,
)
from fm3d.data.nrrd_reader import nrrd_files, read_nrrd
from fm3d.data.volume import Volume

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's columns."""
    norms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def read_volume(
    path: str | Path, *, series_uid: str | None = None, limits: ReadLimits | None = None
) -> Volume:
    """Read a CT volume (NIfTI, NRRD, a DICOM series folder or one DICOM file) in HU.

    `series_uid` picks one SeriesInstanceUID when a DICOM folder holds several series;
    `limits` bounds what the file may make fm3d allocate or read (default `ReadLimits()`).
    Raises `VolumeReadError`, naming the file, for anything that cannot become a trustworthy
    HU volume (unreadable, non-CT, gaps between slices, non-finite voxels, implausible geometry, ...).
    """
    path = _as_path(path)
    limits = limits or ReadLimits()
    kind = _format_of(path)
    if series_uid is not None and kind != "dicom":
        raise VolumeReadError(path, "series_uid was given but the file is not DICOM", "drop series_uid")
    if kind == "dicom":
        from fm3d.data.dicom import read_dicom  # pydicom is only imported when needed

        volume = read_dicom(path, series_uid=series_uid, limits=limits)
    elif kind == "nifti":
        volume = _read_nifti(path, limits)
    else:
        volume = _read_nrrd(path, limits)
    volume.array = _as_hu(path, volume.array)
    return volume


def read_label(path: str | Path, *, limits: ReadLimits | None = None) -> Volume:
    """Read a label map (NIfTI or NRRD), keeping its integer values and dtype."""
    path = _as_path(path)
    limits = limits or ReadLimits()
    kind = _format_of(path)
    if kind == "dicom":
        raise VolumeReadError(
            path, "DICOM label maps (DICOM-SEG) are not supported", "convert it to NIfTI or NRRD first"
        )
    volume = _read_nifti(path, limits) if kind == "nifti" else _read_nrrd(path, limits)
    volume.array = _as_label(path, volume.array)
    return volume


def source_files(
    path: str | Path, *, series_uid: str | None = None, limits: ReadLimits | None = None
) -> list[Path]:
    """Every file that reading `path` touches, found after checking its format (nothing is read whole).

    A NIfTI or attached NRRD is itself; a detached NRRD is its header and data file; a DICOM
    folder is the files of the series it holds. A cache fingerprints exactly these, so a change
    to any of them re-prepares the study, and a folder that is no CT is refused before hashing.
    """
    path = _as_path(path)
    limits = limits or ReadLimits()
    kind = _format_of(path)
    if kind == "nrrd":
        return nrrd_files(path, limits)
    if kind == "dicom" and path.is_dir():
        from fm3d.data.dicom import series_files

        return series_files(path, series_uid)
    return [path]


def _as_path(path: str | Path) -> Path:
    # Path("") is ".", which would read the current folder as a DICOM series.
    if not str(path).strip():
        raise VolumeReadError(
            "<empty path>", "an empty path was given for a volume", "fill in the image or label path"
        )
    return Path(path)


def _format_of(path: Path) -> str:
    if not path.exists():
        raise VolumeReadError(
            path, "does not exist", "check the path (relative paths resolve against the manifest)"
        )
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    require_regular_file(path, "volume file")
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if name.endswith(".dcm") or _has_dicom_preamble(path):
        return "dicom"
    raise VolumeReadError(
        path,
        "is not a format fm3d reads",
        "use NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), a DICOM file or a folder holding one DICOM series",
    )


def _has_dicom_preamble(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _read_nifti(path: Path, limits: ReadLimits) -> Volume:
    try:
        image = nib.load(path)
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) != 3:
            raise VolumeReadError(
                path, f"has shape {image.shape}, not a 3D volume", "pass one 3D volume per file"
            )
        _check_nifti_orientation(path, image.header)
        _check_nifti_size(path, image, limits)
        # dataobj applies scl_slope/scl_inter and keeps an integer dtype when there is no scaling.
        array = np.asanyarray(image.dataobj)
    except VolumeReadError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise VolumeReadError(
            path,
            f"is truncated or corrupt ({type(exc).__name__}: {exc})",
            "re-export or re-download the file",
        ) from exc
    affine = np.asarray(image.affine, dtype=np.float64)
    meta = {
        "source": str(path),
        "format": "nifti",
        "modality": None,
        "on_disk_dtype": str(image.get_data_dtype()),
    }
    return Volume(array=array, affine=affine, spacing=check_geometry(path, affine), meta=meta)


def _check_nifti_orientation(path: Path, header: Any) -> None:
    """Refuse a NIfTI with neither sform nor qform: nibabel would place it by pixdim alone (0 mm -> 1 mm)."""
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise VolumeReadError(
            path,
            "has no orientation (its sform and qform codes are both 0), so where its voxels lie is unknown",
            "re-export it with its geometry (e.g. dcm2niix from the DICOM); fm3d will not guess it",
        )


def _check_nifti_size(path: Path, image: Any, limits: ReadLimits) -> None:
    """Declared shape x dtype against the budget, and (uncompressed) against the bytes the file holds."""
    proxy = image.dataobj
    stored = np.dtype(image.get_data_dtype()).itemsize
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    check_array_bytes(path, image.shape, max(stored, 8) if scaled else stored, limits, "a volume")
    if not path.name.lower().endswith(".gz"):
        declared = int(np.prod(image.shape, dtype=np.int64)) * stored
        check_body_size(path, declared, path.stat().st_size - int(getattr(proxy, "offset", 0)))


def _read_nrrd(path: Path, limits: ReadLimits) -> Volume:
    array, affine, meta = read_nrrd(path, limits)
    return Volume(array=array, affine=affine, spacing=check_geometry(path, affine), meta=meta)


def _as_hu(path: Path, array: np.ndarray) -> np.ndarray:
    """HU as int16 when that is exact, float32 otherwise; refuses non-finite voxels."""
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise VolumeReadError(
                path,
                f"has {bad} NaN or infinite voxels out of {array.size}",
                "fix the export that produced it; fm3d will not guess HU for them",
            )
        if np.array_equal(array, np.round(array)) and _fits_int16(array):
            return array.astype(np.int16)
        return array.astype(np.float32, copy=False)
    if array.dtype.kind in "iu":
        return array.astype(np.int16) if _fits_int16(array) else array.astype(np.float32)
    raise VolumeReadError(
        path, f"has voxel type {array.dtype}, not numbers", "store the CT as integers or floats"
    )


def _as_label(path: Path, array: np.ndarray) -> np.ndarray:
    """Integer labels in their own dtype; whole-number float labels become the smallest fitting int."""
    if array.dtype.kind in "iub":
        return array.astype(np.uint8) if array.dtype.kind == "b" else array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise VolumeReadError(
                path,
                "is a label map with non-integer values",
                "labels must be whole numbers; threshold probability maps first",
            )
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        for dtype in (np.uint8, np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return array.astype(dtype)
    raise VolumeReadError(
        path, f"has voxel type {array.dtype}, not integer labels", "store labels as integers"
    )


def _fits_int16(array: np.ndarray) -> bool:
    if array.size == 0:
        return True
    return bool(array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max)
