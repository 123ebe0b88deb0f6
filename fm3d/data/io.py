"""Reading CT volumes and label maps from NIfTI, NRRD and DICOM into one `Volume` type.

Every reader returns the voxels in the file's own order together with the 4x4 affine that
maps a voxel index to RAS world millimetres, so geometry never depends on guessing an axis
convention later; `fm3d.data.preprocess` turns that into fm3d's [D, H, W] canonical grid.
"""

from __future__ import annotations

import bz2
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import nrrd
import numpy as np

from fm3d.data.errors import VolumeReadError
from fm3d.data.limits import (
    ReadLimits,
    check_array_bytes,
    check_body_size,
    check_geometry,
    require_regular_file,
)

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
        with path.open("rb") as fh:
            header = _nrrd_header(path, fh)
        data_file = _nrrd_data_file(path, header, limits)
        return [path] if data_file is None else [path, data_file]
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
    try:
        with path.open("rb") as fh:
            header = _nrrd_header(path, fh)
            array = _nrrd_data(path, fh, header, limits)
    except VolumeReadError:
        raise
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
        if "spacings" not in header:
            raise VolumeReadError(
                path,
                "has neither 'space directions' nor 'spacings', so its voxel size is unknown",
                "save it with its geometry; fm3d will not assume 1 mm voxels",
            )
        directions = np.diag(np.asarray(header["spacings"], dtype=np.float64))
    directions = np.asarray(directions, dtype=np.float64)
    if directions.shape != (3, 3):
        raise VolumeReadError(path, "has no usable 'space directions' for its 3 axes", "re-export the file")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # pynrrd gives one row per array axis
    affine[:3, 3] = origin
    affine[:3] *= np.asarray(_NRRD_SPACE_TO_RAS[space])[:, None]
    meta = {"source": str(path), "format": "nrrd", "modality": None, "nrrd_space": space}
    return Volume(array=array, affine=affine, spacing=check_geometry(path, affine), meta=meta)


def _nrrd_header(path: Path, fh: IO[bytes]) -> dict[str, Any]:
    try:
        return nrrd.read_header(fh)
    except Exception as exc:  # NRRDError, UnicodeDecodeError, ValueError for a damaged header
        raise VolumeReadError(
            path, f"has no readable NRRD header ({type(exc).__name__}: {exc})", "re-export the file"
        ) from exc


def _nrrd_data_file(path: Path, header: dict[str, Any], limits: ReadLimits) -> Path | None:
    """The detached data file a `.nhdr` names, refused when it leaves the header's folder (unless allowed)."""
    name = header.get("data file", header.get("datafile"))
    if name is None:
        return None
    name = str(name)
    if name.startswith("LIST") or len(name.split()) > 1:
        raise VolumeReadError(
            path, f"splits its data over several files ({name!r})", "save it as one .nrrd or one data file"
        )
    data_file = path.parent / name
    inside = data_file.resolve().is_relative_to(path.parent.resolve())
    if not inside and not limits.allow_external_data:
        raise VolumeReadError(
            path,
            f"names the data file {data_file} outside the header's folder {path.parent}",
            "move the data file beside the header, or allow it explicitly "
            "(ReadLimits(allow_external_data=True); fm3d prepare --allow-external-data)",
        )
    if not data_file.exists():
        raise VolumeReadError(
            path, f"names the data file {data_file}, which does not exist", "copy it beside the header"
        )
    require_regular_file(data_file, "NRRD data file")
    return data_file


def _nrrd_data(path: Path, fh: IO[bytes], header: dict[str, Any], limits: ReadLimits) -> np.ndarray:
    """The voxels, after checking the declared size against the budget and the bytes present."""
    dtype = nrrd.reader._determine_datatype(header)
    sizes = [int(n) for n in header["sizes"]]
    check_array_bytes(path, tuple(sizes), dtype.itemsize, limits, "a volume")
    declared = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    data_file = _nrrd_data_file(path, header, limits)
    encoding = str(header.get("encoding", "raw")).lower()
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    if encoding == "raw":
        available = data_file.stat().st_size if data_file else path.stat().st_size - fh.tell()
        check_body_size(path, declared, available - max(byte_skip, 0))
    if (
        encoding in ("gzip", "gz", "bzip2", "bz2")
        and int(header.get("line skip", header.get("lineskip", 0))) == 0
    ):
        return _nrrd_compressed(path, fh, data_file, header, dtype, declared, byte_skip, encoding)
    return nrrd.read_data(header, fh, str(path))


def _nrrd_compressed(
    path: Path,
    fh: IO[bytes],
    data_file: Path | None,
    header: dict[str, Any],
    dtype: np.dtype,
    declared: int,
    byte_skip: int,
    encoding: str,
) -> np.ndarray:
    """Inflate at most the declared bytes: pynrrd inflates everything, so a small bomb fills memory."""
    skip = max(byte_skip, 0)
    limit = declared + skip
    source = data_file.open("rb") if data_file else fh
    try:
        out = _inflate(source, encoding, limit)
    finally:
        if data_file:
            source.close()
    data = out[-declared:] if byte_skip == -1 else out[skip : skip + declared]
    if len(data) != declared or len(out) > limit:
        held = f"more than {declared}" if len(out) > limit else str(max(len(out) - skip, 0))
        raise VolumeReadError(
            path,
            f"is truncated or corrupt: it holds {held} bytes of {encoding} voxel data "
            f"where its header declares {declared}",
            "re-export or re-copy the file",
        )
    array = np.frombuffer(bytes(data), dtype).reshape(tuple(int(n) for n in header["sizes"][::-1]))
    return array.T  # pynrrd's Fortran order: the first header size is the first array axis


def _inflate(source: IO[bytes], encoding: str, limit: int) -> bytearray:
    """Decompress a gzip or bzip2 stream, stopping one byte past `limit`."""
    out = bytearray()
    if encoding.startswith("g"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        while len(out) <= limit and not inflater.eof:
            data = inflater.unconsumed_tail or source.read(1 << 16)
            if not data:
                break
            out += inflater.decompress(data, limit + 1 - len(out))
        return out
    bunzip = bz2.BZ2Decompressor()
    while len(out) <= limit and not bunzip.eof:
        data = source.read(1 << 16) if bunzip.needs_input else b""
        if bunzip.needs_input and not data:
            break
        out += bunzip.decompress(data, limit + 1 - len(out))
    return out


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
