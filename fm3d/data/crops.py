"""VoCo crop geometry: base crops on a grid, random crops and their overlap labels.

VoCo (Wu et al., CVPR 2024; VoCo-v2 in the Large-Scale-Medical repository) cuts a region
of a CT into a grid of non-overlapping "base" crops and draws a few "random" crops inside
the same region; the target of each random crop is the share of its x-y area that falls on
each base crop. This module reproduces that geometry exactly, from:

- VoCo v1: `Luffy03/VoCo`, `utils/data_utils.py`: `get_crop_transform` (bases),
  `get_vanilla_transform` and `get_position_label` (random crops and labels),
  `VoCoAugmentation` (number of random crops = `args.sw_batch_size`, default 2 in
  `voco_train.py`); the region is the volume resized to 384x384x96 (x, y, z), bases are
  96^3 and every crop is resized to 64^3 (`roi_small`).
- VoCo v2: `Luffy03/Large-Scale-Medical`, `Self-supervised/utils/voco_trans.py`: the same
  three functions with `num_crops=3`, `max_roi=192`, `roi=64` and no resize; the region is
  a `RandSpatialCropd` of 192x192x64 (`Self-supervised/utils/data_trans.py`).

In fm3d's [D, H, W] = (z, y, x) order VoCo's x-y plane is the H-W plane, so the v2 region
(x, y, z) = (192, 192, 64) is (64, 192, 192) here. Every crop spans the region's full
depth (VoCo centres them at z = roi // 2). Base crops keep VoCo's order, x-major:
base k = i * n + j covers W in [i * b, (i + 1) * b) and H in [j * b, (j + 1) * b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VoCoGeometry:
    """Where VoCo's base and random crops lie inside one region, and their output size.

    Attributes:
        name: preset name ("v1", "v2") or a user label.
        grid: number of base crops per side in the H-W plane (n; K = n * n bases).
        base_size: edge in voxels of every crop (bases and random crops are cubes of this
            edge; the region's depth equals it).
        output_size: edge in voxels each crop is resized to (equal to base_size: no resize).
        num_random_crops: random crops drawn per region (VoCo's `sw_batch_size`).
    """

    name: str
    grid: int
    base_size: int
    output_size: int
    num_random_crops: int = 2

    def __post_init__(self) -> None:
        if min(self.grid, self.base_size, self.output_size, self.num_random_crops) < 1:
            raise ValueError(f"VoCoGeometry {self.name!r}: every size and count must be >= 1, got {self}")

    @property
    def region_size(self) -> tuple[int, int, int]:
        """(D, H, W) voxels of the region the crops are cut from."""
        side = self.grid * self.base_size
        return (self.base_size, side, side)

    @property
    def num_bases(self) -> int:
        """K, the number of base crops."""
        return self.grid * self.grid

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """(d, h, w) of every crop after the resize."""
        return (self.output_size,) * 3

    def base_starts(self) -> np.ndarray:
        """[K, 2] (h0, w0) corner of each base crop in the region, VoCo's x-major order."""
        b = self.base_size
        i, j = np.divmod(np.arange(self.num_bases), self.grid)  # k = i * n + j; i along x (W), j along y (H)
        return np.stack([j * b, i * b], axis=1)

    def draw_random_centres(self, rng: np.random.Generator) -> np.ndarray:
        """[R, 2] (h, w) centres of the random crops, drawn as VoCo's `get_position_label`.

        VoCo draws `center_x, center_y = randint(half, max_roi - half)` (upper bound
        exclusive) per crop, x first; the crop then spans [centre - half, centre + half)
        and never leaves the region.
        """
        half = self.base_size // 2
        high = self.grid * self.base_size - half
        centres = np.empty((self.num_random_crops, 2), dtype=np.int64)
        for r in range(self.num_random_crops):
            centre_x = rng.integers(half, high)
            centre_y = rng.integers(half, high)
            centres[r] = (centre_y, centre_x)
        return centres

    def overlap_labels(self, centres_hw: np.ndarray) -> np.ndarray:
        """[R, K] share of each random crop's H-W area lying on each base crop.

        VoCo's `get_position_label`: for base (i, j) the overlap is
        dx * dy / roi^2 with dx, dy the clipped interval intersections (0 when either is
        <= 0). A random crop inside the region has labels summing to 1.
        """
        centres_hw = np.asarray(centres_hw, dtype=np.int64).reshape(-1, 2)
        half, b = self.base_size // 2, self.base_size
        lo = centres_hw - half  # [R, 2] (h, w)
        hi = centres_hw + half
        starts = self.base_starts()  # [K, 2]
        inter_lo = np.maximum(lo[:, None, :], starts[None, :, :])
        inter_hi = np.minimum(hi[:, None, :], starts[None, :, :] + b)
        extent = np.clip(inter_hi - inter_lo, 0, None)  # [R, K, 2]
        return (extent[..., 0] * extent[..., 1]) / float(b * b)

    def random_starts(self, centres_hw: np.ndarray) -> np.ndarray:
        """[R, 2] (h0, w0) corners of the random crops with the given centres."""
        return np.asarray(centres_hw, dtype=np.int64) - self.base_size // 2


VOCO_V1 = VoCoGeometry(name="v1", grid=4, base_size=96, output_size=64, num_random_crops=2)
VOCO_V2 = VoCoGeometry(name="v2", grid=3, base_size=64, output_size=64, num_random_crops=2)
# Not a VoCo preset: a 2x2 grid of 32^3 crops over (32, 64, 64), for CPU tests and the demo cohort.
VOCO_TINY = VoCoGeometry(name="tiny", grid=2, base_size=32, output_size=32, num_random_crops=2)

VOCO_PRESETS: dict[str, VoCoGeometry] = {g.name: g for g in (VOCO_V1, VOCO_V2, VOCO_TINY)}


def voco_geometry(name_or_geometry: str | VoCoGeometry) -> VoCoGeometry:
    """The preset called `name` ("v1", "v2", "tiny"), or the geometry itself."""
    if isinstance(name_or_geometry, VoCoGeometry):
        return name_or_geometry
    try:
        return VOCO_PRESETS[name_or_geometry]
    except KeyError:
        raise ValueError(
            f"unknown VoCo geometry {name_or_geometry!r}; choose one of {sorted(VOCO_PRESETS)} "
            "or pass a VoCoGeometry"
        ) from None
