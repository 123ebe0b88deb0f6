"""Canonical preprocessing: RAS [D, H, W] grid, target spacing, HU window, int16, and its inverse.

Every prepared study lives on the same kind of grid: the RAS-canonical volume (nibabel's
`as_closest_canonical` axes) transposed to [D, H, W] = (z, y, x), resampled so that the
field of view is kept and the spacing is as close to `target_spacing_mm` as a whole number
of voxels allows (as nnU-Net does), with HU clipped to a window and stored as int16.
A `PreprocessRecord` keeps what is needed to put a prediction made on that grid back onto
the original file's grid (`invert_preprocessing`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from fm3d.data.errors import VolumeReadError
from fm3d.data.limits import ReadLimits, check_array_bytes
from fm3d.data.volume import Volume
from fm3d.spec import InputSpec

RECORD_VERSION = 1
# A spacing this close to the target (mm) is left alone, so already-prepared data is copied exactly.
SPACING_ATOL_MM = 1e-3
# Index (d, h, w) of the canonical array is index (x, y, z) = (w, h, d) of nibabel's canonical array.
_DHW_TO_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclass(frozen=True)
class PreprocessRecord:
    """How one prepared array relates to its source file; JSON-serialisable (`to_dict`/`from_dict`).

    `orientation` is nibabel's orientation array (one [axis, flip] row per source axis)
    taking the source voxel order to RAS; affines are row-major 4x4 flattened to 16 floats.
    """

    original_shape: tuple[int, int, int]
    original_affine: tuple[float, ...]
    orientation: tuple[tuple[float, float], ...]
    canonical_shape: tuple[int, int, int]  # [D, H, W] before resampling
    canonical_spacing: tuple[float, float, float]
    shape: tuple[int, int, int]  # [D, H, W] of the prepared array
    spacing: tuple[float, float, float]
    affine: tuple[float, ...]  # prepared [d, h, w] index -> RAS mm
    target_spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float]
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists: plain JSON types

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessRecord:
        if data.get("version") != RECORD_VERSION:
            raise ValueError(
                f"preprocessing record version {data.get('version')} is not {RECORD_VERSION}; "
                "re-run `fm3d prepare` with this fm3d version"
            )
        tupled = {
            k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in data.items()
        }
        return cls(**tupled)

    def prepared_affine(self) -> np.ndarray:
        """4x4 matrix from a [d, h, w] index of the prepared array to RAS world mm."""
        return np.asarray(self.affine, dtype=np.float64).reshape(4, 4)


@dataclass
class PreparedVolume:
    """A study on the canonical grid: int16 HU [D, H, W], its label map if any, and the record."""

    image: np.ndarray
    label: np.ndarray | None
    record: PreprocessRecord

    @property
    def affine(self) -> np.ndarray:
        return self.record.prepared_affine()

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.record.spacing


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient to RAS and transpose to [D, H, W]; returns (array, its affine, nibabel orientation)."""
    ornt = orientations.io_orientation(affine)
    ras = orientations.apply_orientation(array, ornt)
    ras_affine = affine @ orientations.inv_ornt_aff(ornt, array.shape)
    return np.ascontiguousarray(ras.transpose(2, 1, 0)), ras_affine @ _DHW_TO_XYZ, ornt


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    """Voxels per axis that keep the field of view at (about) the target spacing; at least 1."""
    out = []
    for n, s, t in zip(shape, spacing, target, strict=True):
        out.append(n if abs(s - t) <= SPACING_ATOL_MM else max(1, round(n * s / t)))
    return tuple(out)


def resample(array: np.ndarray, shape: tuple[int, int, int], *, is_label: bool) -> np.ndarray:
    """Resize a [D, H, W] array to `shape`, voxel centres mapped with half-voxel alignment.

    Images interpolate trilinearly (float32 out); labels take the nearest voxel
    (`nearest-exact`, whose centre mapping matches the trilinear one) and keep their dtype.
    """
    if tuple(array.shape) == tuple(shape):
        return np.array(array, copy=True)
    if is_label:
        # nearest-exact works on floats; float32 holds integers up to 2**24 exactly.
        if np.abs(array).max(initial=0) >= 2**24:
            raise ValueError("label values must stay below 2**24 to be resampled exactly")
        source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        out = F.interpolate(source, size=tuple(shape), mode="nearest-exact")
        return out[0, 0].numpy().astype(array.dtype)
    source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(source, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resampled_affine(
    affine: np.ndarray, old_shape: tuple[int, ...], new_shape: tuple[int, ...]
) -> np.ndarray:
    """Affine of an array resized by `resample`: new index o sits at old index (o + 0.5) * n/m - 0.5."""
    scale = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * scale - 0.5
    return affine @ index_map


def preprocess(
    volume: Volume,
    spec: InputSpec | None = None,
    *,
    label: Volume | None = None,
    limits: ReadLimits | None = None,
) -> PreparedVolume:
    """Bring a CT (and its label map, on the same grid) to fm3d's canonical prepared form.

    Of the input spec only `target_spacing_mm` and `hu_window` matter here; intensity scaling,
    axis order and input size are the sampler's (`fm3d.data.views`).

    The resampled grid is checked against `limits.max_array_bytes` before it is allocated,
    so a header with a huge spacing cannot turn into a huge array.
    """
    spec = spec or InputSpec()
    limits = limits or ReadLimits()
    if label is not None:
        _check_same_grid(volume, label)
    canonical, canonical_affine, ornt = to_canonical(volume.array, volume.affine)
    canonical_spacing = tuple(float(x) for x in np.linalg.norm(canonical_affine[:3, :3], axis=0))
    shape = resampled_shape(canonical.shape, canonical_spacing, spec.target_spacing_mm)
    check_array_bytes(
        volume.meta.get("source", "volume"),
        shape,
        4,  # the float32 interpolation output, the largest array resampling allocates
        limits,
        f"a resampled grid at {list(spec.target_spacing_mm)} mm",
    )
    lo, hi = spec.hu_window
    # Clip before interpolating so out-of-window values (e.g. -3024 outside the scan circle)
    # cannot drag in-window edges; interpolation of clipped values stays inside the window.
    clipped = np.clip(canonical.astype(np.float32), lo, hi)
    image = np.rint(resample(clipped, shape, is_label=False)).astype(np.int16)
    prepared_label = None
    if label is not None:
        label_canonical, _, _ = to_canonical(label.array, label.affine)
        prepared_label = resample(label_canonical, shape, is_label=True)
    affine = resampled_affine(canonical_affine, canonical.shape, shape)
    record = PreprocessRecord(
        original_shape=tuple(int(n) for n in volume.array.shape),
        original_affine=tuple(float(x) for x in np.asarray(volume.affine).ravel()),
        orientation=tuple((float(a), float(f)) for a, f in ornt),
        canonical_shape=tuple(int(n) for n in canonical.shape),
        canonical_spacing=canonical_spacing,
        shape=tuple(int(n) for n in shape),
        spacing=tuple(float(x) for x in np.linalg.norm(affine[:3, :3], axis=0)),
        affine=tuple(float(x) for x in affine.ravel()),
        target_spacing_mm=tuple(float(s) for s in spec.target_spacing_mm),
        hu_window=(float(lo), float(hi)),
    )
    return PreparedVolume(image=image, label=prepared_label, record=record)


def invert_preprocessing(
    array_dhw: np.ndarray, record: PreprocessRecord | dict[str, Any], *, is_label: bool
) -> np.ndarray:
    """Map an array on the prepared grid back onto the source file's grid and voxel order.

    Labels (is_label=True) use nearest neighbour and keep their dtype; images and
    probability maps interpolate trilinearly and come back as float32. Save the result with
    `record.original_affine` (e.g. `nibabel.Nifti1Image(out, affine)`) to overlay the source.
    """
    if isinstance(record, dict):
        record = PreprocessRecord.from_dict(record)
    if tuple(array_dhw.shape) != tuple(record.shape):
        raise ValueError(f"array has shape {tuple(array_dhw.shape)}, but the prepared grid is {record.shape}")
    source = np.asarray(array_dhw) if is_label else np.asarray(array_dhw, dtype=np.float32)
    canonical = resample(source, record.canonical_shape, is_label=is_label)
    ras = canonical.transpose(2, 1, 0)
    ornt = np.asarray(record.orientation)
    back = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")), ornt)
    original = orientations.apply_orientation(ras, back)
    return np.ascontiguousarray(original)


def _check_same_grid(volume: Volume, label: Volume) -> None:
    same_shape = tuple(volume.array.shape) == tuple(label.array.shape)
    if not same_shape or not np.allclose(volume.affine, label.affine, atol=1e-2):
        raise VolumeReadError(
            label.meta.get("source", "label"),
            f"is not on the image's grid (label shape {label.array.shape} vs image {volume.array.shape}, "
            f"affines differ by up to {np.abs(volume.affine - label.affine).max():.3g} mm) "
            f"for image {volume.meta.get('source')}",
            "export the label on the image's own grid",
        )
