"""MAE's view: one region and the tokens its encoder does not see.

Batch keys (per sample): `mae_image` [1, D, H, W] float32, cut as the global view `image` is
(one region, random in training and centred in evaluation, resized when `region` differs from
`size`, intensity augmentation only); `mae_mask` [T] bool with exactly round(mask_ratio * T)
True (masked) tokens, T = (size // patch_size) multiplied, in `x.flatten(2)` order. Every row
masks the same number of tokens because MAE's encoder drops the masked ones and the batch must
still stack. `masking`: "random" is MAE's uniform choice, "block" iBOT-style boxes topped up
with random tokens to the exact count (`fm3d.data.masking`). Masks are drawn in evaluation too
(from the evaluation generator: the same every epoch), so validation computes the same loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from fm3d.data.masking import block_mask, random_mask
from fm3d.data.views import GlobalView, Size3, View, ViewContext, ViewError, _size3, register_view

_SETTING = "data.views.mae"


@register_view("mae")
class MaskedImageView(View):
    """MAE's `mae_image` and `mae_mask` (see the module docstring).

    size: (D, H, W) of the image, divisible by patch_size. region: voxels read before resizing
    to `size` (None: = size). patch_size: the encoder's patch (int or (d, h, w)).
    mask_ratio: share of tokens masked, 0 < r < 1 (MAE: 0.75). masking: "random" or "block".
    mask_min_block: smallest box of a block mask, in tokens.
    """

    keys = ("mae_image", "mae_mask")

    def __init__(
        self,
        size: Sequence[int] = (96, 96, 96),
        region: Sequence[int] | None = None,
        patch_size: int | Sequence[int] = 16,
        mask_ratio: float = 0.75,
        masking: Literal["random", "block"] = "random",
        mask_min_block: int = 4,
    ) -> None:
        self.size = _size3(size, f"{_SETTING}.size")
        self.region = self.size if region is None else _size3(region, f"{_SETTING}.region")
        patch = _size3(
            [patch_size] * 3 if isinstance(patch_size, int) else patch_size, f"{_SETTING}.patch_size"
        )
        if any(s % p for s, p in zip(self.size, patch, strict=True)):
            raise ViewError(f"{_SETTING}.size {self.size} is not divisible by patch_size {patch}")
        self.patch_size = patch
        self.grid: Size3 = tuple(s // p for s, p in zip(self.size, patch, strict=True))
        tokens = math.prod(self.grid)
        if not 0.0 < mask_ratio < 1.0:
            raise ViewError(f"{_SETTING}.mask_ratio must be between 0 and 1 (exclusive), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.num_masked = round(self.mask_ratio * tokens)
        if not 0 < self.num_masked < tokens:
            raise ViewError(
                f"{_SETTING}.mask_ratio {mask_ratio} of {tokens} tokens masks {self.num_masked}; MAE needs "
                "some tokens masked and some visible: raise size or lower patch_size, or change the ratio"
            )
        if masking not in ("random", "block"):
            raise ViewError(f"{_SETTING}.masking must be 'random' or 'block', got {masking!r}")
        self.masking = masking
        if int(mask_min_block) < 1:
            raise ViewError(f"{_SETTING}.mask_min_block must be at least one token, got {mask_min_block}")
        self.mask_min_block = int(mask_min_block)
        self._image = GlobalView(self.size, self.region)  # the cut, scaling and augmentation

    @property
    def image_size(self) -> Size3:
        return self.size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"mae_image": (1, *self.size)}

    def fill(self, volume, rng: np.random.Generator, context: ViewContext, out) -> dict[str, Any]:
        into = out.get("mae_image")
        image = self._image.fill(volume, rng, context, {} if into is None else {"image": into})["image"]
        if self.masking == "random":
            mask = random_mask(math.prod(self.grid), self.num_masked, rng)
        else:
            mask = block_mask(self.grid, self.num_masked, rng, min_block=self.mask_min_block, exact=True)
        return {"mae_image": image, "mae_mask": torch.from_numpy(mask)}  # [1, D, H, W], [T]
