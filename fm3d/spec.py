"""The input spec: what an encoder's input voxels mean, as one object.

Preparation resamples to `target_spacing_mm` and clips to `hu_window`; sampling clips to the
window again and scales it linearly to `intensity_range`; the encoder config records the spec
its weights were trained with, so `fm3d.load_encoder` can hand back matching preprocessing
(as timm's pretrained config and open_clip's `create_model_and_transforms` do).

Axis order names the order of the encoder's three spatial input axes in terms of the RAS
volume's: "zyx" is fm3d's [D, H, W] (a RAS volume transposed), "xyz" MONAI's [H, W, D] as
`LoadImage` + `Orientation("RAS")` give it (VoCo, SwinUNETR, UNETR weights).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from fm3d.errors import Fm3dError

AxisOrder = Literal["zyx", "xyz"]
AXIS_ORDERS: tuple[str, ...] = ("zyx", "xyz")
# Prepared volumes are int16: a window must fit in it.
INT16_RANGE = (-32768.0, 32767.0)
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 50.0


class InputSpecError(Fm3dError, ValueError):
    """An input spec that is malformed, or that disagrees with the data or weights it meets."""


@dataclass(frozen=True)
class InputSpec:
    """Spacing, HU window, intensity range, axis order and input size of an encoder's input.

    target_spacing_mm: voxel spacing (D, H, W) in mm the volume is resampled to.
    hu_window: (low, high) HU the volume is clipped to; whole HU values inside int16.
    intensity_range: the values the window's low and high ends are scaled to
        ([0, 1] VoCo/Merlin, [-1, 1] CT-CLIP).
    axis_order: "zyx" (fm3d) or "xyz" (MONAI-style peers); see the module docstring.
    image_size: (D, H, W) voxels of the crop the weights were trained on; None where any size
        the encoder's patching divides will do.
    """

    target_spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.5)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    intensity_range: tuple[float, float] = (0.0, 1.0)
    axis_order: AxisOrder = "zyx"
    image_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        spacing = _floats(self.target_spacing_mm, 3, "target_spacing_mm")
        window = _floats(self.hu_window, 2, "hu_window")
        intensity = _floats(self.intensity_range, 2, "intensity_range")
        if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
            raise InputSpecError(
                f"target_spacing_mm must be three mm values (D, H, W) between {MIN_SPACING_MM} and "
                f"{MAX_SPACING_MM}, got {spacing}"
            )
        low, high = window
        if (
            not (low < high and low.is_integer() and high.is_integer())
            or low < INT16_RANGE[0]
            or (high > INT16_RANGE[1])
        ):
            raise InputSpecError(
                f"hu_window must be whole HU values (low, high), low < high, inside int16, got {window}"
            )
        if intensity[0] == intensity[1]:
            raise InputSpecError(f"intensity_range needs two different values, got {intensity}")
        if self.axis_order not in AXIS_ORDERS:
            raise InputSpecError(f"axis_order must be one of {AXIS_ORDERS}, got {self.axis_order!r}")
        size = self.image_size
        if size is not None:
            size = tuple(int(n) for n in size)
            if len(size) != 3 or min(size) < 1:
                raise InputSpecError(f"image_size must be three positive voxel counts (D, H, W), got {size}")
        object.__setattr__(self, "target_spacing_mm", spacing)
        object.__setattr__(self, "hu_window", window)
        object.__setattr__(self, "intensity_range", intensity)
        object.__setattr__(self, "image_size", size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """The spec `to_dict` wrote; an unknown key is an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputSpecError(f"unknown input spec keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> InputSpec:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_prepared(self, prepared: InputSpec, source: str) -> None:
        """Refuse to sample with this spec from volumes prepared with `prepared` when that would be wrong.

        The spacing must match, and this window must lie inside the one the volumes were
        clipped to at preparation: a wider window would read saturated voxels as the window's
        ends without a word.
        """
        if not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(
            self.target_spacing_mm, prepared.target_spacing_mm, strict=True
        )):  # fmt: skip
            raise InputSpecError(
                f"{source} was prepared at {list(prepared.target_spacing_mm)} mm, but the spec asks for "
                f"{list(self.target_spacing_mm)} mm; prepare again with --spacing or change the spec"
            )
        low, high = self.hu_window
        prepared_low, prepared_high = prepared.hu_window
        if low < prepared_low or high > prepared_high:
            raise InputSpecError(
                f"{source} was clipped to {list(prepared.hu_window)} HU when prepared; the window "
                f"{list(self.hu_window)} would read the clipped voxels as its ends; prepare again with "
                f"--hu-window {low:g} {high:g} or narrow hu_window"
            )


def _floats(values: Any, count: int, name: str) -> tuple[float, ...]:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputSpecError(f"{name} must be {count} numbers, got {values!r}") from None
    if len(floats) != count or not all(map(math.isfinite, floats)):
        raise InputSpecError(f"{name} must be {count} finite numbers, got {values!r}")
    return floats
