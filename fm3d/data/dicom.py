"""DICOM CT reading: a series of single-frame files in a folder, or one multi-frame Enhanced CT.

Each file's or frame's placement becomes a `Slice`, which `fm3d.data.dicom_stack` orders and
checks into one regular grid; rescale slope/intercept is applied per slice. Compressed
transfer syntaxes (JPEG 2000, JPEG-LS, RLE, JPEG) decode through pydicom's pixel handlers,
which use pylibjpeg and pyjpegls.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fm3d.data.dicom_stack import Slice, checked_slice, slice_numbers, stack_slices
from fm3d.data.errors import VolumeReadError
from fm3d.data.limits import ReadLimits, check_body_size
from fm3d.data.volume import Volume

logger = logging.getLogger(__name__)

_DECODER_HINT = (
    "the file may be truncated; for compressed transfer syntaxes install pylibjpeg, "
    "pylibjpeg-openjpeg, pylibjpeg-libjpeg and pyjpegls"
)


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
            checked_slice(
                file,
                Slice(
                    position=slice_numbers(file, ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                    orientation=slice_numbers(file, ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                    pixel_spacing=tuple(slice_numbers(file, ds.PixelSpacing, 2, "PixelSpacing")),
                    thickness=_thickness(ds),
                    slope=float(ds.get("RescaleSlope", 1.0)),
                    intercept=float(ds.get("RescaleIntercept", 0.0)),
                    pixels=lambda file=file, ds=ds: _decode(file, ds),
                ),
            )
        )
    first = datasets[0]
    meta = _meta(source, first, "dicom", len(slices))
    return stack_slices(source, slices, meta, _grid(first, len(slices)), limits)


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
            checked_slice(
                path,
                Slice(
                    position=slice_numbers(path, position.ImagePositionPatient, 3, "ImagePositionPatient"),
                    orientation=slice_numbers(
                        path, orientation.ImageOrientationPatient, 6, "ImageOrientationPatient"
                    ),
                    pixel_spacing=tuple(slice_numbers(path, measures.PixelSpacing, 2, "PixelSpacing")),
                    thickness=_thickness(measures),
                    slope=float(rescale.get("RescaleSlope", 1.0)),
                    intercept=float(rescale.get("RescaleIntercept", 0.0)),
                    pixels=lambda i=i: all_frames()[i],
                ),
            )
        )
    return stack_slices(path, slices, _meta(path, ds, "dicom-enhanced", frames), _grid(ds, frames), limits)


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
