"""Placed 2D CT slices -> one regular 3D grid: ordering, gap and spacing checks, and the RAS affine.

Slices are ordered by their position along the slice normal (never by file name or
InstanceNumber, which scanners and anonymisers reorder); each slice's geometry is checked
(finite, perpendicular unit directions, positive pixel spacing) before it joins the stack;
gaps and uneven steps are refused rather than silently stretched; and the stacked volume is
checked against the memory budget before any pixel is decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fm3d.data.errors import VolumeReadError
from fm3d.data.limits import ReadLimits, check_array_bytes, check_geometry
from fm3d.data.volume import Volume

logger = logging.getLogger(__name__)

# A step may differ from the series' median step by this fraction before it counts as a gap:
# positions are stored as decimal strings, so small rounding differences are normal.
STEP_TOLERANCE = 0.05
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Slice:
    """Geometry and rescale of one 2D frame, before the frames are stacked."""

    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None
    slope: float
    intercept: float
    pixels: Callable[[], np.ndarray]  # [rows, cols] stored values, decoded on demand


def slice_numbers(file: Path, value: object, count: int, key: str) -> np.ndarray:
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


def checked_slice(file: Path, s: Slice) -> Slice:
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


def stack_slices(
    source: Path,
    slices: list[Slice],
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


def _slice_step(source: Path, slices: list[Slice], heights: np.ndarray, normal: np.ndarray) -> np.ndarray:
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
