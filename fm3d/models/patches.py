"""Volumes to per-patch voxel vectors and back: the targets of masked-image reconstruction (MAE).

The patch order is the encoder's token order (row-major over the (d, h, w) grid, as
`x.flatten(2)` of [B, C, d, h, w]), and each patch vector is ordered (pd, ph, pw, c): MAE's
`patchify` ('nchpwq->nhwpqc') with a depth axis added in front. This differs from the
(c, pd, ph, pw) order `PatchEmbed3d` reads its weight in; the two never meet, since a
reconstruction target only has to agree with the decoder's prediction layer.
"""

from __future__ import annotations

import math

import torch

from fm3d.models.config import EncoderInputError


def patchify3d(volume: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Cut [B, C, D, H, W] into non-overlapping patches: [B, N, pd * ph * pw * C], N = d * h * w."""
    if volume.ndim != 5:
        raise EncoderInputError(f"patchify3d expects [B, C, D, H, W], got shape {tuple(volume.shape)}.")
    batch, chans, *spatial = volume.shape
    if any(s % p for s, p in zip(spatial, patch_size, strict=True)):
        raise EncoderInputError(
            f"volume size {tuple(spatial)} (D, H, W) is not divisible by the patch size {tuple(patch_size)}."
        )
    pd, ph, pw = patch_size
    d, h, w = (s // p for s, p in zip(spatial, patch_size, strict=True))
    x = volume.reshape(batch, chans, d, pd, h, ph, w, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, d, h, w, pd, ph, pw, C]
    return x.reshape(batch, d * h * w, pd * ph * pw * chans)


def unpatchify3d(
    patches: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int]
) -> torch.Tensor:
    """The inverse of `patchify3d`: [B, N, pd * ph * pw * C] on a (d, h, w) grid -> [B, C, D, H, W]."""
    pd, ph, pw = patch_size
    d, h, w = grid
    voxels = pd * ph * pw
    if patches.ndim != 3 or patches.shape[1] != d * h * w or patches.shape[2] % voxels:
        raise EncoderInputError(
            f"unpatchify3d expects [B, {math.prod(grid)}, k * {voxels}] for grid {tuple(grid)} and patch "
            f"size {tuple(patch_size)}, got shape {tuple(patches.shape)}."
        )
    batch, chans = patches.shape[0], patches.shape[2] // voxels
    x = patches.reshape(batch, d, h, w, pd, ph, pw, chans)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, d, pd, h, ph, w, pw]
    return x.reshape(batch, chans, d * pd, h * ph, w * pw)
