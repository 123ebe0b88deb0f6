"""DINO's multi-crop view for 3D CT: global and local crops of physical extent, augmented, with iBOT masks.

Batch keys (per sample; the batch adds a leading B):
- `global_crops` [G, 1, *global_size] float32: the teacher's and student's large views;
- `local_crops` [L, 1, *local_size] float32: the student's small views (L may be 0: the key
  then holds an empty [0, 1, *local_size] tensor, so the batch layout does not depend on L);
- `global_masks` [G, T] bool: iBOT's masked tokens of each global crop, T = the global crop's
  patch grid (global_size // patch_size per axis) multiplied, in `x.flatten(2)` order
  (`fm3d.data.masking`).

Geometry (DINOv2's `RandomResizedCrop`, in millimetres). A crop's longest physical edge is
drawn between `extent_mm[0]` and `extent_mm[1]` so that its *volume* is uniform (edge =
cbrt(U(lo^3, hi^3))), as DINO draws the area share uniformly. The crop is the output size at the
cache's spacing zoomed by one factor on every axis, so its voxels keep the cache's proportions
(3 x 1.5 x 1.5 mm stays 2:1:1): the encoder sees the voxel geometry it meets at inference, where
volumes arrive at the input spec's spacing. The region read is output size x zoom voxels per
axis (at least one), read once as integers from the memory map (`read_region`; outside the
volume it reads the HU floor, as every view does) and resized trilinearly to the output size.
DINO's aspect-ratio jitter is left out: the affine's per-axis scale (+-10 %) gives the
anisotropy instead. Defaults: 96^3 global and 48^3 local crops (3DINO's sizes for a 16^3-patch
ViT on an isotropic cache; give an anisotropic cache's proportions, e.g. 64 x 128 x 128 at
3 x 1.5 x 1.5 mm, for cubic crops), 8 local crops (DINOv2), and extents that keep DINOv2's
volume shares (global 0.32-1, local 0.05-0.32) of a 192 mm cube.

Augmentation (training only; `context.augment` is None in evaluation): per crop, a bias field
and TorchIO's RandomAffine, RandomGamma, RandomBlur (std in mm: each crop carries its voxel
spacing) and RandomNoise, with DINO's asymmetric blur between the global crops, then fm3d's
flips, quarter turns and intensity shift/scale; `fm3d.data.multicrop_augment`. Every draw
comes from the sample's numpy Generator, so samples are reproducible across worker counts.

Masks (DINOv2's iBOT settings). Each global crop is masked with probability
`mask_probability`; a masked one hides exactly int(T * U(mask_ratio)) tokens in blocks
(`block_mask`: boxes of at least `mask_min_block` tokens, none larger than T / 2, topped up
with single tokens in the rare case the boxes stop short). DINOv2 fixes how many crops
of a *batch* are masked and spreads their ratios over the range (`collate_data_and_cast`); a
per-sample view draws both per crop, which gives the same expectations. Masks are drawn in
evaluation too, from the evaluation generator, so a validation step can compute iBOT's loss.
Evaluation crops are centred, their extents drawn from that generator: the same every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fm3d.data.masking import block_mask
from fm3d.data.multicrop_augment import CropAugmenter, MultiCropAugment
from fm3d.data.regions import read_region, region_start, scale_window
from fm3d.data.views import Size3, View, ViewContext, ViewError, _size3, register_view

Spacing3 = tuple[float, float, float]
_SETTING = "data.views.multicrop"


@register_view("multicrop")
class MultiCropView(View):
    """DINO/iBOT's global and local crops with token masks (see the module docstring).

    global_size, local_size: (D, H, W) output voxels, divisible by patch_size.
    num_global, num_local: crops of each kind (G >= 1, L >= 0).
    global_extent_mm, local_extent_mm: range of a crop's longest physical edge in mm.
    patch_size: the encoder's patch (int or (d, h, w)), for the mask grid.
    mask_probability: share of global crops that get a mask (DINOv2: 0.5).
    mask_ratio: (min, max) share of a masked crop's tokens that are masked (DINOv2: 0.1-0.5).
    mask_min_block: smallest block of masked tokens drawn.
    augment: `MultiCropAugment` or its settings as a mapping.
    """

    keys = ("global_crops", "local_crops", "global_masks")

    def __init__(
        self,
        global_size: Sequence[int] = (96, 96, 96),
        local_size: Sequence[int] = (48, 48, 48),
        num_global: int = 2,
        num_local: int = 8,
        global_extent_mm: Sequence[float] = (130.0, 192.0),
        local_extent_mm: Sequence[float] = (70.0, 130.0),
        patch_size: int | Sequence[int] = 16,
        mask_probability: float = 0.5,
        mask_ratio: Sequence[float] = (0.1, 0.5),
        mask_min_block: int = 4,
        augment: MultiCropAugment | Mapping[str, Any] | None = None,
    ) -> None:
        self.global_size = _size3(global_size, f"{_SETTING}.global_size")
        self.local_size = _size3(local_size, f"{_SETTING}.local_size")
        self.patch_size = _patch3(patch_size, f"{_SETTING}.patch_size")
        for name, size in (("global_size", self.global_size), ("local_size", self.local_size)):
            _check_divisible(size, self.patch_size, f"{_SETTING}.{name}")
        if any(lo > gl for lo, gl in zip(self.local_size, self.global_size, strict=True)):
            raise ViewError(
                f"{_SETTING}.local_size {self.local_size} is larger than global_size {self.global_size} "
                "on some axis; local crops are the small views"
            )
        if int(num_global) < 1 or int(num_local) < 0:
            raise ViewError(
                f"{_SETTING}: num_global must be >= 1 and num_local >= 0, got {num_global}, {num_local}"
            )
        self.num_global, self.num_local = int(num_global), int(num_local)
        self.global_extent_mm = _extent(global_extent_mm, f"{_SETTING}.global_extent_mm")
        self.local_extent_mm = _extent(local_extent_mm, f"{_SETTING}.local_extent_mm")
        if self.local_extent_mm[1] > self.global_extent_mm[1]:
            raise ViewError(
                f"{_SETTING}.local_extent_mm {self.local_extent_mm} reaches beyond global_extent_mm "
                f"{self.global_extent_mm}; local crops should not be larger than global ones"
            )
        if not 0.0 <= mask_probability <= 1.0:
            raise ViewError(f"{_SETTING}.mask_probability must be in [0, 1], got {mask_probability}")
        self.mask_probability = float(mask_probability)
        low, high = _pair(mask_ratio, f"{_SETTING}.mask_ratio")
        if not 0.0 <= low <= high < 1.0:
            raise ViewError(
                f"{_SETTING}.mask_ratio must be (min, max) with 0 <= min <= max < 1, got {mask_ratio}"
            )
        self.mask_ratio = (low, high)
        if int(mask_min_block) < 1:
            raise ViewError(f"{_SETTING}.mask_min_block must be at least one token, got {mask_min_block}")
        self.mask_min_block = int(mask_min_block)
        self.augment = MultiCropAugment.of(augment)
        self._augmenter = CropAugmenter(self.augment)

    @property
    def grid(self) -> Size3:
        """Patch tokens per axis of a global crop."""
        return tuple(s // p for s, p in zip(self.global_size, self.patch_size, strict=True))

    @property
    def image_size(self) -> Size3:
        return self.global_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "global_crops": (self.num_global, 1, *self.global_size),
            "local_crops": (self.num_local, 1, *self.local_size),
        }

    def fill(self, volume, rng: np.random.Generator, context: ViewContext, out) -> dict[str, Any]:
        stacks = {}
        for key, count, size, extent in (
            ("global_crops", self.num_global, self.global_size, self.global_extent_mm),
            ("local_crops", self.num_local, self.local_size, self.local_extent_mm),
        ):
            stack = out.get(key)
            stack = torch.empty((count, 1, *size)) if stack is None else stack  # [N, 1, D, H, W]
            spacings = [self._crop(volume, rng, context, extent, stack[c, 0]) for c in range(count)]
            if context.augment is not None:
                first, others, local = self.augment.blur_probs
                blur = [first] + [others] * (count - 1) if key == "global_crops" else [local] * count
                self._augmenter(stack, spacings, blur, rng, context.augment)
            stacks[key] = stack
        return {**stacks, "global_masks": self._masks(rng)}

    def _crop(
        self,
        volume: np.ndarray,
        rng: np.random.Generator,
        context: ViewContext,
        extent: tuple[float, float],
        into: torch.Tensor,
    ) -> Spacing3:
        """Cut one crop into `into` [D, H, W]; returns its output voxel spacing in mm."""
        size = tuple(into.shape)
        low, high = extent
        edge_mm = float(np.cbrt(rng.uniform(low**3, high**3)))  # uniform in volume
        zoom = edge_mm / max(s * mm for s, mm in zip(size, context.spacing_mm, strict=True))
        region = tuple(max(1, round(s * zoom)) for s in size)
        start = region_start(volume.shape, region, rng if context.train else None)
        shifted = torch.from_numpy(read_region(volume, start, region, context.hu_window))  # [d, h, w] int
        if region == size:
            scale_window(shifted, context.hu_window, context.intensity_range, out=into)
        else:
            scaled = scale_window(shifted, context.hu_window, context.intensity_range)
            resized = F.interpolate(scaled[None, None], size=size, mode="trilinear", align_corners=True)
            into.copy_(resized[0, 0])
        return tuple(r * mm / s for r, mm, s in zip(region, context.spacing_mm, size, strict=True))

    def _masks(self, rng: np.random.Generator) -> torch.Tensor:
        """[G, T] bool: iBOT's masked tokens of each global crop (all False where unmasked)."""
        tokens = math.prod(self.grid)
        masks = np.zeros((self.num_global, tokens), dtype=bool)
        for c in range(self.num_global):
            if rng.random() < self.mask_probability:
                count = int(tokens * rng.uniform(*self.mask_ratio))
                masks[c] = block_mask(self.grid, count, rng, min_block=self.mask_min_block, exact=True)
        return torch.from_numpy(masks)


def _patch3(value: int | Sequence[int], name: str) -> Size3:
    return _size3([value] * 3 if isinstance(value, int) else value, name)


def _check_divisible(size: Size3, patch: Size3, name: str) -> None:
    if any(s % p for s, p in zip(size, patch, strict=True)):
        raise ViewError(f"{name} {size} is not divisible by patch_size {patch}; pick multiples of the patch")


def _pair(values: Sequence[float], name: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in values)
    if len(pair) != 2 or pair[0] > pair[1]:
        raise ViewError(f"{name} must be a range (min, max) with min <= max, got {values!r}")
    return pair


def _extent(values: Sequence[float], name: str) -> tuple[float, float]:
    low, high = _pair(values, name)
    if low <= 0:
        raise ViewError(f"{name} must be positive edge lengths in mm, got {values!r}")
    return low, high
