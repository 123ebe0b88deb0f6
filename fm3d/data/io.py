"""Reading CT volumes and label maps from NIfTI, NRRD and DICOM into one `Volume` type.

Every reader returns the voxels in the file's own order together with the 4x4 affine that
maps a voxel index to RAS world millimetres, so geometry never depends on guessing an axis
convention later; `fm3d.data.preprocess` turns that into fm3d's [D, H, W] canonical grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np

from fm3d.data.errors import VolumeReadError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")

# NRRD spaces as the sign flip that takes them to RAS.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}


@dataclass
class Volume:
    """A 3D image in the file's own voxel order, with the geometry to place it in the patient.

    `array` holds HU for CT (int16 when the stored values are whole numbers that fit,
    float32 otherwise) or integer labels for label maps; `affine` maps a voxel index
    (i, j, k) of `array` to RAS world mm; `spacing` is the voxel size along each array
    axis in mm; `meta` records the source path, format and modality.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's columns."""
    norms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def read_volume(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume (NIfTI, NRRD, a DICOM series folder or one DICOM file) in HU.

    `series_uid` picks one SeriesInstanceUID when a DICOM folder holds several series.
    Raises `VolumeReadError`, naming the file, for anything that cannot become a trustworthy
    HU volume (unreadable, non-CT, gaps between slices, non-finite voxels, ...).
    """
    path = Path(path)
    kind = _format_of(path)
    if series_uid is not None and kind != "dicom":
        raise VolumeReadError(path, "series_uid was given but the file is not DICOM", "drop series_uid")
    if kind == "dicom":
        from fm3d.data.dicom import read_dicom  # pydicom is only imported when needed

        volume = read_dicom(path, series_uid=series_uid)
    elif kind == "nifti":
        volume = _read_nifti(path)
    else:
        volume = _read_nrrd(path)
    volume.array = _as_hu(path, volume.array)
    return volume


def read_label(path: str | Path) -> Volume:
    """Read a label map (NIfTI or NRRD), keeping its integer values and dtype."""
    path = Path(path)
    kind = _format_of(path)
    if kind == "dicom":
        raise VolumeReadError(
            path, "DICOM label maps (DICOM-SEG) are not supported", "convert it to NIfTI or NRRD first"
        )
    volume = _read_nifti(path) if kind == "nifti" else _read_nrrd(path)
    volume.array = _as_label(path, volume.array)
    return volume


def _format_of(path: Path) -> str:
    if not path.exists():
        raise VolumeReadError(
            path, "does not exist", "check the path (relative paths resolve against the manifest)"
        )
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
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


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(path)
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) != 3:
            raise VolumeReadError(
                path, f"has shape {image.shape}, not a 3D volume", "pass one 3D volume per file"
            )
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
    return Volume(array=array, affine=affine, spacing=spacing_of(affine), meta=meta)


def _read_nrrd(path: Path) -> Volume:
    try:
        array, header = nrrd.read(str(path))
    except Exception as exc:  # pynrrd raises NRRDError, zlib and value errors for damaged files
        raise VolumeReadError(
            path, f"is truncated or corrupt ({type(exc).__name__}: {exc})", "re-export the file"
        ) from exc
    if array.ndim != 3:
        raise VolumeReadError(
            path, f"has {array.ndim} dimensions, not a 3D volume", "pass one 3D volume per file"
        )
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _NRRD_SPACE_TO_RAS:
        raise VolumeReadError(
            path,
            f"uses NRRD space {space!r}, which has no patient orientation",
            "save it in a patient space such as left-posterior-superior",
        )
    directions = header.get("space directions")
    if directions is None:
        spacings = header.get("spacings", (1.0, 1.0, 1.0))
        directions = np.diag(np.asarray(spacings, dtype=np.float64))
    directions = np.asarray(directions, dtype=np.float64)
    if directions.shape != (3, 3) or not np.isfinite(directions).all():
        raise VolumeReadError(path, "has no usable 'space directions' for its 3 axes", "re-export the file")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # pynrrd gives one row per array axis
    affine[:3, 3] = origin
    affine[:3] *= np.asarray(_NRRD_SPACE_TO_RAS[space])[:, None]
    meta = {"source": str(path), "format": "nrrd", "modality": None, "nrrd_space": space}
    return Volume(array=array, affine=affine, spacing=spacing_of(affine), meta=meta)


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
