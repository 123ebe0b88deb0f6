"""NRRD reading (`.nrrd`, and `.nhdr` headers with a detached data file) with bounded resources.

pynrrd parses the header; the voxels are read only after the declared size has been checked
against the memory budget and the bytes present, compressed data is inflated no further than
the declared size (pynrrd would inflate a gzip bomb whole), and a `.nhdr` may name a data file
only inside its own folder unless the caller allows otherwise (`ReadLimits.allow_external_data`).
"""

from __future__ import annotations

import bz2
import zlib
from pathlib import Path
from typing import IO, Any

import nrrd
import numpy as np

from fm3d.data.errors import VolumeReadError
from fm3d.data.limits import ReadLimits, check_array_bytes, check_body_size, require_regular_file

# NRRD spaces as the sign flip that takes them to RAS.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}


def read_nrrd(path: Path, limits: ReadLimits) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The voxels (first header axis first), the 4x4 voxel -> RAS mm affine and the meta of a NRRD file.

    The declared size is checked against `limits` and against the bytes present before any
    voxel is read; `fm3d.data.io` checks the geometry and wraps the result in a `Volume`.
    """
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
    return array, affine, meta


def nrrd_files(path: Path, limits: ReadLimits) -> list[Path]:
    """The header and, for a detached header, its data file (refused outside the header's folder)."""
    with path.open("rb") as fh:
        header = _nrrd_header(path, fh)
    data_file = _nrrd_data_file(path, header, limits)
    return [path] if data_file is None else [path, data_file]


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
