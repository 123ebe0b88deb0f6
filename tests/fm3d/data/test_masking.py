"""Token masks: exact counts, blocks that are boxes, the ViT's token order, reproducibility, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from fm3d.data.masking import _place_boxes, block_mask, random_mask
from fm3d.data.views import ViewError


@pytest.mark.parametrize(("num_tokens", "num_masked"), [(216, 0), (216, 162), (27, 26), (64, 64), (1, 1)])
def test_random_mask_masks_exactly_the_count(num_tokens: int, num_masked: int):
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = random_mask(num_tokens, num_masked, rng)
        assert mask.dtype == bool and mask.shape == (num_tokens,) and mask.sum() == num_masked


def test_random_mask_is_uniform_over_tokens():
    # MAE's argsort of uniform noise makes every token equally likely: 3000 draws of 12 of 48
    # tokens give each token ~750 hits (binomial std ~24); a bias would show far outside +-6 std.
    rng = np.random.default_rng(1)
    hits = sum(random_mask(48, 12, rng).astype(int) for _ in range(3000))
    assert np.abs(hits - 750).max() < 6 * math.sqrt(3000 * 0.25 * 0.75)


@pytest.mark.parametrize(
    ("grid", "ratio"),
    [((6, 6, 6), 0.1), ((6, 6, 6), 0.5), ((4, 8, 8), 0.3), ((3, 3, 3), 0.5), ((8, 8, 8), 0.75)],
)
def test_block_mask_never_overshoots_and_exact_hits_the_count(grid, ratio):
    tokens = math.prod(grid)
    target = int(ratio * tokens)
    rng = np.random.default_rng(2)
    for _ in range(30):
        loose = block_mask(grid, target, rng)
        assert loose.shape == (tokens,) and loose.dtype == bool and loose.sum() <= target
        assert block_mask(grid, target, rng, exact=True).sum() == target


def test_exact_tops_up_where_boxes_cannot_reach():
    # Cubes only (max_aspect 1) of 7+ tokens have edge 2 and do not fit a 1 x 1 x 8 grid: no box.
    rng = np.random.default_rng(3)
    assert _place_boxes((1, 1, 8), 7, rng, 7, 1.0, None)[1] == []
    for _ in range(20):
        assert block_mask((1, 1, 8), 7, rng, min_block=7, max_aspect=1.0).sum() == 0
        assert block_mask((1, 1, 8), 7, rng, min_block=7, max_aspect=1.0, exact=True).sum() == 7


def test_blocks_are_solid_boxes_in_the_tokens_order_of_flatten():
    grid = (5, 6, 7)
    d, h, w = grid
    # Each token of a [1, 3, d, h, w] patch embedding carries its own (i, j, k); x.flatten(2)
    # lists the tokens in the order a mask indexes them.
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    coords = torch.stack(axes)[None]  # [1, 3, d, h, w]
    tokens = coords.flatten(2)[0].T  # [N, 3]
    for seed in range(10):
        target = int(0.4 * d * h * w)
        mask = block_mask(grid, target, np.random.default_rng(seed), min_block=4, max_aspect=3.0)
        volume, boxes = _place_boxes(grid, target, np.random.default_rng(seed), 4, 3.0, None)
        painted = np.zeros(grid, dtype=bool)
        for start, size in boxes:
            assert all(s >= 0 and s + e <= n for s, e, n in zip(start, size, grid, strict=True))
            assert max(size) <= 3.0 * min(size)
            painted[tuple(slice(s, s + e) for s, e in zip(start, size, strict=True))] = True
        assert np.array_equal(painted, volume)
        masked = {tuple(t) for t in tokens[torch.from_numpy(mask)].tolist()}
        assert masked == {tuple(c) for c in np.argwhere(volume).tolist()}
        # Each box is one face-connected piece, so the mask has no more pieces than boxes.
        assert ndimage.label(volume)[1] <= len(boxes)


def test_block_masks_are_far_more_clustered_than_random_ones():
    grid, target = (8, 8, 8), 154  # 30 %
    rng = np.random.default_rng(4)

    def masked_neighbours(mask: np.ndarray) -> float:
        m = mask.reshape(grid)
        pairs = sum(
            (np.take(m, range(1, n), a) & np.take(m, range(n - 1), a)).sum() for a, n in enumerate(grid)
        )
        return pairs / m.sum()

    blocks = np.mean([masked_neighbours(block_mask(grid, target, rng, exact=True)) for _ in range(20)])
    scattered = np.mean([masked_neighbours(random_mask(512, target, rng)) for _ in range(20)])
    assert blocks > 2 * scattered


def test_masks_are_a_function_of_the_generator():
    a = block_mask((6, 6, 6), 80, np.random.default_rng(7), exact=True)
    b = block_mask((6, 6, 6), 80, np.random.default_rng(7), exact=True)
    c = block_mask((6, 6, 6), 80, np.random.default_rng(8), exact=True)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    draws = [random_mask(50, 9, np.random.default_rng(5)) for _ in range(2)]
    assert np.array_equal(*draws)


def test_bad_arguments_raise_view_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ViewError, match=r"cannot mask 30 of 27 tokens; ask for 0 to 27"):
        block_mask((3, 3, 3), 30, rng)
    with pytest.raises(ViewError, match=r"cannot mask -1 of 10 tokens"):
        random_mask(10, -1, rng)
    with pytest.raises(ViewError, match=r"three positive token counts"):
        block_mask((3, 3), 2, rng)
    with pytest.raises(ViewError, match=r"min_block must be at least one token"):
        block_mask((3, 3, 3), 2, rng, min_block=0)
    with pytest.raises(ViewError, match=r"max_aspect .* must be >= 1"):
        block_mask((3, 3, 3), 2, rng, max_aspect=0.5)
