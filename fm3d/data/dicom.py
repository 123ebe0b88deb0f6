"""DICOM CT reading: a series of single-frame files in a folder, or one multi-frame Enhanced CT.

Slices are ordered by their position along the slice normal (never by file name or
InstanceNumber, which scanners and anonymisers reorder), gaps and uneven steps are refused
rather than silently stretched, and rescale slope/intercept is applied per slice. Compressed
transfer syntaxes (JPEG 2000, JPEG-LS, RLE, JPEG) decode through pydicom's pixel handlers,
which use pylibjpeg and pyjpegls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import Volume
from fm3d.data.limits import ReadLimits, check_array_bytes, check_body_size, check_geometry

logger = logging.getLogger(__name__)

# A step may differ from the series' median step by this fraction before it counts as a gap:
# positions are stored as decimal strings, so small rounding differences are normal.
STEP_TOLERANCE = 0.05
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DECODER_HINT = (
    "the file may be truncated; for compressed transfer syntaxes install pylibjpeg, "
    "pylibjpeg-openjpeg, pylibjpeg-libjpeg and pyjpegls"
)


@dataclass
class _Slice:
    """Geometry and rescale of one 2D frame, before the frames are stacked."""

    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None
    slope: float
    intercept: float
    pixels: Callable[[], np.ndarray]  # [rows, cols] stored values, decoded on demand


def read_dicom(path: Path, *, series_uid: str | None = None, limits: ReadLimits | None = None) -> Volume:
    """Read a DICOM CT from a folder (one series, or the one `series_uid` names) or one file."""
    limits = limits or ReadLimits()
    if path.is_dir():
        files = series_files(path, series_uid)
        if len(files) == 1:
            return read_dicom(files[0], series_uid=series_uid, limits=limits)
        return _classic(path, files, limits)
    dataset = _read(path, header_only=False)
    if series_uid is not None and dataset.get("SeriesInstanceUID") != series_uid:
        raise VolumeReadError(
            path,
            f"belongs to series {dataset.get('SeriesInstanceUID')}, not {series_uid}",
            "check the series UID",
        )
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in dataset:
        return _enhanced(path, dataset, limits)
    return _classic(path, [path], limits, datasets=[dataset])


def _read(path: Path, *, header_only: bool) -> Dataset:
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise VolumeReadError(
            path, f"is not a DICOM file ({exc})", "remove it or point at the DICOM files"
        ) from exc
    except Exception as exc:  # pydicom raises EOFError, ValueError, struct errors for damaged files
        raise VolumeReadError(
            path, f"is truncated or corrupt ({type(exc).__name__}: {exc})", "re-export or re-copy the file"
        ) from exc
    if "SOPClassUID" not in dataset and "Modality" not in dataset:
        # pydicom parses garbage after a valid preamble into unknown elements rather than failing.
        raise VolumeReadError(
            path,
            "is truncated or corrupt (no SOP Class or Modality could be parsed)",
            "re-export or re-copy the file",
        )
    return dataset


def series_files(folder: Path, series_uid: str | None) -> list[Path]:
    """The files of the one series to read, after grouping the folder's DICOM files by series.

    Only headers are read, so this is also how a cache learns which files a study depends on.
    """
    series: dict[str, list[Path]] = {}
    descriptions: dict[str, str] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if not (file.name.lower().endswith(".dcm") or _has_preamble(file)):
            continue  # READMEs, label files and other companions of a series folder
        header = _read(file, header_only=True)
        if "SeriesInstanceUID" not in header:
            logger.debug("ignoring %s: a DICOM file outside any series (e.g. DICOMDIR)", file)
            continue
        uid = str(header.SeriesInstanceUID)
        series.setdefault(uid, []).append(file)
        descriptions.setdefault(uid, str(header.get("SeriesDescription", "") or "no description"))
    if not series:
        raise VolumeReadError(folder, "holds no DICOM files", "point at the folder of one DICOM series")
    listing = "; ".join(f"{uid} ({descriptions[uid]!r}, {len(files)} files)" for uid, files in series.items())
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeReadError(
                folder,
                f"has no series {series_uid}; it holds {listing}",
                "pick one of the listed SeriesInstanceUIDs",
            )
        return series[series_uid]
    if len(series) > 1:
        raise VolumeReadError(
            folder,
            f"holds {len(series)} series: {listing}",
            "pick one with series_uid= (fm3d prepare: a manifest column named by --series-uid-column)",
        )
    return next(iter(series.values()))


def _has_preamble(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _check_ct(path: Path, dataset: Dataset) -> None:
    modality = dataset.get("Modality")
    if modality != "CT":
        raise VolumeReadError(
            path,
            f"has modality {modality!r}, not CT",
            "fm3d prepares CT only; remove this study from the manifest",
        )


def _classic(
    source: Path, files: list[Path], limits: ReadLimits, datasets: list[Dataset] | None = None
) -> Volume:
    """Stack single-frame CT images (one per file) into a volume."""
    datasets = datasets or [_read(f, header_only=False) for f in files]
    slices = []
    for file, ds in zip(files, datasets, strict=True):
        _check_ct(file, ds)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeReadError(
                file,
                f"is a multi-frame image among {len(files)} files of one series",
                "point image_path at one multi-frame file, not at their folder",
            )
        if (ds.get("Rows"), ds.get("Columns")) != (datasets[0].get("Rows"), datasets[0].get("Columns")):
            raise VolumeReadError(
                file,
                f"is {ds.get('Rows')} x {ds.get('Columns')} pixels where {files[0].name} is "
                f"{datasets[0].get('Rows')} x {datasets[0].get('Columns')}",
                "a series must be one stack of equal slices; pick one series",
            )
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in ds:
                raise VolumeReadError(
                    file, f"lacks {key}, so its slice cannot be placed", "the file is not a usable CT image"
                )
        slices.append(
            _checked(
                file,
                _Slice(
                    position=_numbers(file, ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                    orientation=_numbers(file, ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                    pixel_spacing=tuple(_numbers(file, ds.PixelSpacing, 2, "PixelSpacing")),
                    thickness=_thickness(ds),
                    slope=float(ds.get("RescaleSlope", 1.0)),
                    intercept=float(ds.get("RescaleIntercept", 0.0)),
                    pixels=lambda file=file, ds=ds: _decode(file, ds),
                ),
            )
        )
    first = datasets[0]
    meta = _meta(source, first, "dicom", len(slices))
    return _stack(source, slices, meta, _grid(first, len(slices)), limits)


def _numbers(file: Path, value: object, count: int, key: str) -> np.ndarray:
    """A multi-valued decimal attribute as `count` floats, or an error naming the file and attribute."""
    try:
        numbers = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise VolumeReadError(
            file, f"has a {key} that is not numbers ({value!r})", "re-export the series"
        ) from exc
    if numbers.size != count:
        raise VolumeReadError(
            file, f"has {numbers.size} values in {key}, not {count}", "re-export the series"
        )
    return numbers


def _checked(file: Path, s: _Slice) -> _Slice:
    """Refuse a slice whose placement cannot be trusted, naming the file, before it joins the stack."""
    if not (np.isfinite(s.position).all() and np.isfinite(s.orientation).all()):
        raise VolumeReadError(
            file,
            "has NaN or infinite ImagePositionPatient or ImageOrientationPatient",
            "repair the series' geometry; fm3d will not guess where the slice lies",
        )
    row, col = s.orientation[:3], s.orientation[3:]
    lengths = np.linalg.norm(row), np.linalg.norm(col)
    if min(lengths) < 0.9 or max(lengths) > 1.1 or abs(float(row @ col)) > 0.1:
        raise VolumeReadError(
            file,
            f"has a degenerate ImageOrientationPatient {s.orientation.tolist()}: "
            "the row and column directions must be perpendicular unit vectors",
            "repair the series' orientation (re-export it from the scanner or PACS)",
        )
    spacing = s.pixel_spacing
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise VolumeReadError(
            file,
            f"has PixelSpacing {[float(v) for v in spacing]}, not two positive mm values",
            "repair PixelSpacing; fm3d will not assume 1 mm",
        )
    return s


def _grid(ds: Dataset, frames: int) -> tuple[tuple[int, int, int], int]:
    """The declared [frames, rows, columns] and bytes per stored sample, read before any pixel is decoded."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    return (frames, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)), max(1, bits // 8)


def _enhanced(path: Path, ds: Dataset, limits: ReadLimits) -> Volume:
    """Stack the frames of a multi-frame Enhanced CT using its functional groups."""
    _check_ct(path, ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise VolumeReadError(
            path,
            "is multi-frame but lacks a per-frame functional group for every frame",
            "the file is not a usable Enhanced CT",
        )
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()

    def group(index: int, sequence: str) -> Dataset | None:
        """A functional group for one frame: per-frame when present, else shared."""
        for item in (per_frame[index], shared):
            if sequence in item and len(item[sequence].value):
                return item[sequence].value[0]
        return None

    cache: dict[str, np.ndarray] = {}

    def all_frames() -> np.ndarray:
        if "pixels" not in cache:
            cache["pixels"] = _decode(path, ds).reshape(frames, int(ds.Rows), int(ds.Columns))
        return cache["pixels"]

    slices = []
    for i in range(frames):
        position, orientation, measures = (
            group(i, "PlanePositionSequence"),
            group(i, "PlaneOrientationSequence"),
            group(i, "PixelMeasuresSequence"),
        )
        if position is None or orientation is None or measures is None:
            raise VolumeReadError(
                path,
                f"frame {i + 1} lacks its plane position, orientation or pixel measures",
                "the file is not a usable Enhanced CT",
            )
        rescale = group(i, "PixelValueTransformationSequence") or ds
        slices.append(
            _checked(
                path,
                _Slice(
                    position=_numbers(path, position.ImagePositionPatient, 3, "ImagePositionPatient"),
                    orientation=_numbers(
                        path, orientation.ImageOrientationPatient, 6, "ImageOrientationPatient"
                    ),
                    pixel_spacing=tuple(_numbers(path, measures.PixelSpacing, 2, "PixelSpacing")),
                    thickness=_thickness(measures),
                    slope=float(rescale.get("RescaleSlope", 1.0)),
                    intercept=float(rescale.get("RescaleIntercept", 0.0)),
                    pixels=lambda i=i: all_frames()[i],
                ),
            )
        )
    return _stack(path, slices, _meta(path, ds, "dicom-enhanced", frames), _grid(ds, frames), limits)


def _thickness(ds: Dataset) -> float | None:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(key)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return None


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if "PixelData" in ds and syntax is not None and not getattr(syntax, "is_compressed", True):
        (frames, rows, cols), itemsize = _grid(ds, int(ds.get("NumberOfFrames", 1) or 1))
        check_body_size(path, frames * rows * cols * itemsize, len(ds.PixelData))
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise RuntimeError, ValueError, NotImplementedError ...
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise VolumeReadError(
            path,
            f"pixel data is truncated, corrupt or cannot be decoded (transfer syntax {name}: {exc})",
            _DECODER_HINT,
        ) from exc


def _stack(
    source: Path,
    slices: list[_Slice],
    meta: dict,
    grid: tuple[tuple[int, int, int], int],
    limits: ReadLimits,
) -> Volume:
    """Order slices along their normal, check the geometry is one regular grid, and stack in HU.

    `grid` is the declared ([frames, rows, columns], bytes per sample) of one file; the stacked
    volume is checked against the memory budget before any pixel is decoded.
    """
    orientation = slices[0].orientation
    for s in slices[1:]:
        if not np.allclose(s.orientation, orientation, atol=1e-4):
            raise VolumeReadError(
                source,
                "mixes slices with different orientations",
                "a series must be one stack; split it or pick one series",
            )
        if not np.allclose(s.pixel_spacing, slices[0].pixel_spacing, rtol=1e-4):
            raise VolumeReadError(source, "mixes slices with different pixel spacings", "pick one series")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    heights = np.array([s.position @ normal for s in slices])
    order = np.argsort(heights, kind="stable")
    slices = [slices[i] for i in order]
    heights = heights[order]
    step_vector = _slice_step(source, slices, heights, normal)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * slices[0].pixel_spacing[1]  # i walks along a row: column spacing
    affine[:3, 1] = col_dir * slices[0].pixel_spacing[0]  # j walks down a column: row spacing
    affine[:3, 2] = step_vector
    affine[:3, 3] = slices[0].position
    affine = _LPS_TO_RAS @ affine
    spacing = check_geometry(source, affine)

    slopes = np.array([s.slope for s in slices])
    intercepts = np.array([s.intercept for s in slices])
    exact = bool(np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)))
    (_, rows, cols), itemsize = grid
    # The stored samples plus the HU array (int32, or float64 before the float32 result).
    check_array_bytes(source, (len(slices), rows, cols), itemsize + (4 if exact else 12), limits, "a volume")
    raw = np.stack([s.pixels() for s in slices])  # [k, rows, cols]
    if exact:
        hu = raw.astype(np.int32) + intercepts.astype(np.int32)[:, None, None]  # exact integer HU
    else:
        hu = (raw.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]).astype(np.float32)
    array = np.ascontiguousarray(hu.transpose(2, 1, 0))  # [i = column, j = row, k = slice]
    return Volume(array=array, affine=affine, spacing=spacing, meta=meta)


def _slice_step(source: Path, slices: list[_Slice], heights: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The world-space vector from one slice to the next, after refusing gaps and uneven steps."""
    if len(slices) == 1:
        thickness = slices[0].thickness
        if thickness is None:
            raise VolumeReadError(
                source,
                "is a single slice without SliceThickness or SpacingBetweenSlices, so its depth is unknown",
                "add the series' other slices, or the slice thickness; fm3d will not assume 1 mm",
            )
        logger.debug("%s has one slice; using %.3f mm along the normal", source, thickness)
        return normal * thickness
    gaps = np.diff(heights)
    if np.any(gaps < 1e-3):
        where = float(heights[1:][gaps < 1e-3][0])
        raise VolumeReadError(
            source,
            f"has two or more slices at the same position ({where:.2f} mm along the normal)",
            "remove duplicate slices or pick one series",
        )
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > STEP_TOLERANCE * step
    if np.any(off):
        first = int(np.argmax(off))
        ratio = gaps[first] / step
        between = f"between {heights[first]:.2f} and {heights[first + 1]:.2f} mm along the normal"
        if ratio > 1.5 and abs(ratio - round(ratio)) < STEP_TOLERANCE * round(ratio):
            raise VolumeReadError(
                source,
                f"has missing slices: a {gaps[first]:.2f} mm gap {between} where the step is {step:.2f} mm "
                f"(about {round(ratio) - 1} slice(s) missing)",
                "re-export the complete series",
            )
        raise VolumeReadError(
            source,
            f"has uneven slice spacing: steps from {gaps.min():.2f} to {gaps.max():.2f} mm "
            f"(first odd step {between})",
            "resample it to a regular grid (e.g. export a NIfTI with dcm2niix) before fm3d prepare",
        )
    return (slices[-1].position - slices[0].position) / (len(slices) - 1)


def _meta(source: Path, ds: Dataset, kind: str, n_slices: int) -> dict:
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    return {
        "source": str(source),
        "format": kind,
        "modality": str(ds.get("Modality")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "n_slices": n_slices,
        "transfer_syntax": getattr(syntax, "name", str(syntax)),
    }
