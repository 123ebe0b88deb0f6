"""Token masks for masked-image objectives: iBOT's blocks on a 3D patch grid, MAE's uniform choice.

A mask is a bool vector over a crop's patch tokens, True = masked, flattened row-major over the
grid (d, h, w): token `(i * h + j) * w + k` is patch (i, j, k), the order `x.flatten(2)` gives
the tokens of a ViT's patch embedding [B, C, d, h, w].

- `block_mask` carries the idea of DINOv2's `MaskingGenerator` (dinov2/data/masking.py) to 3D:
  boxes of random volume (uniform between `min_block` and what the budget still allows, capped
  at `max_block`) and random aspect are dropped at random places until the budget is spent; a
  box is kept only when it masks something new without overshooting the budget, and the
  drawing stops after 10 boxes in a row are refused, so the count may end short of the target.
  `exact=True` tops the mask up with random unmasked tokens to hit the count exactly (MAE's
  encoder drops the masked tokens, so every row of a batch must mask the same number).
- `random_mask` is MAE's masking (`random_masking` in mae/models_mae.py: argsort of uniform
  noise): exactly `num_masked` tokens, every subset equally likely.

Every draw comes from the caller's numpy Generator, so a sample's masks are reproducible.
"""

from __future__ import annotations

import math

import numpy as np

from fm3d.data.views import ViewError

Grid3 = tuple[int, int, int]
Box = tuple[Grid3, Grid3]  # (start, size) on the token grid

# DINOv2's MaskingGenerator: min_num_patches=4, min_aspect=0.3 (so at most 1 / 0.3 between two edges).
DEFAULT_MIN_BLOCK = 4
DEFAULT_MAX_ASPECT = 1 / 0.3
_TRIES_PER_BOX = 10


def block_mask(
    grid: Grid3,
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = DEFAULT_MIN_BLOCK,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    max_block: int | None = None,
    exact: bool = False,
) -> np.ndarray:
    """A bool [d * h * w] mask of about `num_masked` tokens in boxes (see the module docstring).

    grid: tokens per axis (d, h, w). min_block: smallest box volume drawn, in tokens.
    max_aspect: the largest ratio between two edges of a box (>= 1). max_block: largest box
    volume drawn (None: half the grid, as DINOv2's training sets `max_num_patches`).
    exact: top up with random tokens to exactly `num_masked`; without it the count is at most
    `num_masked` and usually a little short.
    """
    mask, _ = _place_boxes(grid, num_masked, rng, min_block, max_aspect, max_block)
    flat = mask.reshape(-1)  # row-major (d, h, w): x.flatten(2)'s token order
    missing = num_masked - int(flat.sum())
    if exact and missing > 0:
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, size=missing, replace=False)] = True
    return flat


def random_mask(num_tokens: int, num_masked: int, rng: np.random.Generator) -> np.ndarray:
    """A bool [num_tokens] mask of exactly `num_masked` tokens drawn uniformly (MAE's masking)."""
    _check_count(num_tokens, num_masked)
    mask = np.zeros(num_tokens, dtype=bool)
    mask[rng.choice(num_tokens, size=num_masked, replace=False)] = True
    return mask


def _place_boxes(
    grid: Grid3,
    num_masked: int,
    rng: np.random.Generator,
    min_block: int,
    max_aspect: float,
    max_block: int | None,
) -> tuple[np.ndarray, list[Box]]:
    """The [d, h, w] mask of the boxes `block_mask` draws, and the boxes in the order they were kept."""
    grid = tuple(int(n) for n in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ViewError(f"a mask grid must be three positive token counts (d, h, w), got {grid!r}")
    num_tokens = math.prod(grid)
    _check_count(num_tokens, num_masked)
    if min_block < 1:
        raise ViewError(f"min_block must be at least one token, got {min_block}")
    if max_aspect < 1:
        raise ViewError(f"max_aspect bounds the ratio of two box edges and must be >= 1, got {max_aspect}")
    max_block = num_tokens // 2 if max_block is None else max_block
    if max_block < 1:
        raise ViewError(f"max_block must be at least one token, got {max_block}")
    mask = np.zeros(grid, dtype=bool)
    boxes: list[Box] = []
    count = 0
    while count < num_masked:
        box = _new_box(mask, min(num_masked - count, max_block), rng, min_block, max_aspect)
        if box is None:
            break
        (i, j, k), (a, b, c) = box
        region = mask[i : i + a, j : j + b, k : k + c]
        count += region.size - int(region.sum())
        region[...] = True
        boxes.append(box)
    return mask, boxes


def _new_box(
    mask: np.ndarray, budget: int, rng: np.random.Generator, min_block: int, max_aspect: float
) -> Box | None:
    """A box masking between 1 and `budget` new tokens, or None when 10 draws in a row fail."""
    # Edges cbrt(volume) * exp(u - mean(u)) with u uniform in +-log(max_aspect) / 2: the product
    # is the volume and no two edges differ by more than max_aspect.
    half_log = math.log(max_aspect) / 2
    for _ in range(_TRIES_PER_BOX):
        volume = rng.uniform(min_block, budget) if budget > min_block else float(budget)
        u = rng.uniform(-half_log, half_log, 3)
        size = np.maximum(np.rint(np.cbrt(volume) * np.exp(u - u.mean())), 1).astype(int)
        if np.any(size > mask.shape) or size.max() > max_aspect * size.min():  # rounding may stretch it
            continue
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(mask.shape, size, strict=True)]
        region = mask[tuple(slice(s, s + e) for s, e in zip(start, size, strict=True))]
        new = region.size - int(region.sum())
        if 0 < new <= budget:
            return (tuple(start), tuple(int(s) for s in size))
    return None


def _check_count(num_tokens: int, num_masked: int) -> None:
    if not 0 <= num_masked <= num_tokens:
        raise ViewError(f"cannot mask {num_masked} of {num_tokens} tokens; ask for 0 to {num_tokens}")
