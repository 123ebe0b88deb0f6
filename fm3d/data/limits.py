"""Checks on what a CT file declares, made before fm3d allocates memory or trusts its geometry.

A header is a claim: dimensions that would need terabytes, a data file outside the header's
folder, a voxel spacing of zero or NaN, a direction matrix that is singular. Each claim is
checked here against the file's real size, a memory budget and plausible CT geometry, so a bad
file becomes one `VolumeReadError` naming it, never a runaway allocation or a silently wrong grid.
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fm3d.data.errors import SettingsError, VolumeReadError

# The largest array a reader (or resampling) may allocate for one volume. A 512 x 512 x 2000 CT
# decoded as float64 is 4 GiB; more than this is a header error far more often than a real scan.
DEFAULT_MAX_ARRAY_BYTES = 8 * 2**30
# Voxel sizes outside this range are not a CT (a 0 mm or 1 km voxel is a broken header).
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0
# |det| of the direction matrix with unit columns: 1 for any rotation, 0 when two axes coincide.
MIN_DIRECTION_VOLUME = 1e-3


@dataclass(frozen=True)
class ReadLimits:
    """What a reader may do for one file: how much it may allocate and where a header may point.

    `allow_external_data` lets a detached NRRD header (`.nhdr`) name a data file outside its
    own folder; it is off by default because the header, not the caller, would pick the file read.
    """

    max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES
    allow_external_data: bool = False

    def __post_init__(self) -> None:
        if not self.max_array_bytes > 0:
            raise SettingsError(f"the memory budget must be positive, got {self.max_array_bytes} bytes")


def format_bytes(n: float) -> str:
    """A byte count for messages: '1.5 GiB', '64.0 TiB', '312 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_array_bytes(
    path: Path, shape: tuple[int, ...], itemsize: int, limits: ReadLimits, what: str
) -> None:
    """Refuse an array whose declared size exceeds the memory budget, before it is allocated."""
    if any(int(n) < 1 for n in shape):
        raise VolumeReadError(
            path, f"declares {what} of shape {tuple(shape)}, which holds no voxels", "re-export the file"
        )
    needed = math.prod(int(n) for n in shape) * itemsize
    if needed > limits.max_array_bytes:
        raise VolumeReadError(
            path,
            f"declares {what} of shape {tuple(int(n) for n in shape)} needing {format_bytes(needed)}, "
            f"over the memory budget of {format_bytes(limits.max_array_bytes)}",
            "check the header's dimensions; if the volume is really this large, raise the budget "
            "(fm3d prepare --max-gib)",
        )


def check_body_size(path: Path, declared: int, available: int) -> None:
    """Refuse a file whose header declares more voxel bytes than the file (from its data offset) holds."""
    if declared > available:
        raise VolumeReadError(
            path,
            f"is truncated or corrupt: its header declares {format_bytes(declared)} of voxel data "
            f"but the file holds only {format_bytes(max(available, 0))}",
            "re-export or re-copy the file",
        )


def require_regular_file(path: Path, role: str = "file") -> None:
    """Refuse FIFOs, devices and sockets: reading one can block forever or never end."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "something other than a file")
    raise VolumeReadError(path, f"is {kind}, not a regular {role}", "point at a regular file or folder")


def check_geometry(path: Path, affine: np.ndarray) -> tuple[float, float, float]:
    """Refuse a non-finite affine, implausible spacing or degenerate directions; returns the spacing.

    Nothing is substituted: a file whose geometry cannot be trusted is an error naming it.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeReadError(
            path,
            "has NaN or infinite values in its voxel-to-world affine (spacing, direction or origin)",
            "repair the header's geometry (e.g. re-export the scan); fm3d will not guess where voxels are",
        )
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    bad = [f"{s:g}" for s in spacing if not MIN_SPACING_MM <= s <= MAX_SPACING_MM]
    if bad:
        raise VolumeReadError(
            path,
            f"has voxel spacing {[round(float(s), 6) for s in spacing]} mm: {', '.join(bad)} mm is outside "
            f"the plausible range {MIN_SPACING_MM}..{MAX_SPACING_MM} mm for CT",
            "repair the header's spacing (pixdim, space directions, PixelSpacing); fm3d will not assume 1 mm",
        )
    volume = abs(float(np.linalg.det(linear / spacing)))
    if volume < MIN_DIRECTION_VOLUME:
        raise VolumeReadError(
            path,
            f"has a degenerate orientation: its axis directions are (nearly) parallel "
            f"(|det| of the unit direction matrix {volume:.2g})",
            "repair the header's direction cosines (srow/qform, space directions, ImageOrientationPatient)",
        )
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))
