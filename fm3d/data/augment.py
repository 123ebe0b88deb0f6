"""Batched random augmentation of crop stacks: flips, rot90 in the H-W plane, intensity shift/scale.

VoCo augments each crop independently with MONAI's `RandFlipd` (p=0.2 per spatial axis),
`RandRotate90d` (p=0.2, k in 1..3, spatial_axes (0, 1) = x-y) and `RandShiftIntensityd`
(offsets 0.1; p=0.5 in v2, 0.1 in v1) (`get_crop_transform` / `get_vanilla_transform`).
Composing MONAI's dictionary transforms per crop costs a dict copy, a MetaTensor and a
Python call chain per crop and transform; here all random parameters for a stack
[N, C, D, H, W] are drawn at once with numpy and applied in place as whole-crop tensor
operations, touching only the crops a draw selects. The operations equal MONAI's `Flip`,
`Rotate90`, `ShiftIntensity` and `ScaleIntensity(factor=...)` (tests compare them).

Parameters come from a caller-owned `numpy.random.Generator`, so a dataset seeded per
worker gives reproducible samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the random augmentations (defaults: VoCo-v2's)."""

    flip_prob: float = 0.2  # per spatial axis
    rot90_prob: float = 0.2  # quarter turns in the H-W plane (VoCo's x-y), k uniform in 1..3
    shift_prob: float = 0.5
    shift_offset: float = 0.1  # intensity + U(-offset, offset), on the [0, 1] scale
    scale_prob: float = 0.0
    scale_factor: float = 0.1  # intensity * (1 + U(-factor, factor))


@dataclass
class AugmentParams:
    """Random draws for N crops: which axes flip, how many quarter turns, intensity offsets/factors."""

    flips: np.ndarray  # [N, 3] bool, axes (D, H, W)
    rot90_k: np.ndarray  # [N] int in 0..3
    offsets: np.ndarray  # [N] float, 0 where not shifted
    factors: np.ndarray  # [N] float, 0 where not scaled

    @classmethod
    def draw(
        cls, n: int, rng: np.random.Generator, config: AugmentConfig, spatial: bool = True
    ) -> AugmentParams:
        """Draw parameters for `n` crops; `spatial=False` keeps orientation (intensity only)."""
        flips = rng.random((n, 3)) < config.flip_prob
        turns = rng.integers(1, 4, size=n) * (rng.random(n) < config.rot90_prob)
        if not spatial:
            flips[:] = False
            turns[:] = 0
        offsets = rng.uniform(-config.shift_offset, config.shift_offset, n) * (
            rng.random(n) < config.shift_prob
        )
        factors = rng.uniform(-config.scale_factor, config.scale_factor, n) * (
            rng.random(n) < config.scale_prob
        )
        return cls(flips, turns.astype(np.int64), offsets, factors)


def spatial_view(crop: torch.Tensor, params: AugmentParams, i: int) -> torch.Tensor:
    """Crop i [..., D, H, W] flipped and turned as drawn (a copy only when it changes).

    Applied to the integer crop before the float conversion, the turn costs half the
    bytes it would after. Flips and quarter turns commute with VoCo v1's cubic resize
    (align_corners=True samples a symmetric grid), so turning before the resize is the same.
    """
    dims = [crop.dim() - 3 + axis for axis in range(3) if params.flips[i, axis]]
    if dims:
        crop = crop.flip(dims)
    k = int(params.rot90_k[i])
    if k:
        if crop.shape[-1] != crop.shape[-2]:
            raise ValueError(f"rot90 in the H-W plane needs H == W, got a crop of shape {tuple(crop.shape)}")
        # MONAI Rotate90(spatial_axes=(0, 1)) turns x towards y; x is W (last dim), y is H.
        crop = torch.rot90(crop, k, dims=(crop.dim() - 1, crop.dim() - 2))
    return crop


def apply_intensity(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Scale then shift each selected crop of a float stack [N, ...], in place; returns `x`."""
    for i in range(x.shape[0]):
        # VoCo ends with RandShiftIntensity; the scale (fm3d's addition) comes before it.
        if params.factors[i]:
            x[i].mul_(1.0 + float(params.factors[i]))
        if params.offsets[i]:
            x[i].add_(float(params.offsets[i]))
    return x


def apply_augmentation(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Augment a float stack [N, C, D, H, W] crop by crop, in place; returns `x`.

    Only the crops a draw selects are touched, so the cost follows the probabilities.
    rot90 needs H == W (VoCo's crops are cubes); for other shapes set rot90_prob to 0.
    """
    n = x.shape[0]
    if len(params.rot90_k) != n:
        raise ValueError(f"augmentation parameters are for {len(params.rot90_k)} crops, the stack has {n}")
    for i in range(n):
        if params.flips[i].any() or params.rot90_k[i]:
            x[i] = spatial_view(x[i], params, i)
    return apply_intensity(x, params)
