"""Batched augmentation equals MONAI's per-image Flip / Rotate90 / ShiftIntensity / ScaleIntensity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Flip, Rotate90, ScaleIntensity, ShiftIntensity

from fm3d.data.augment import AugmentConfig, AugmentParams, apply_augmentation


def _monai_reference(crop_dhw: torch.Tensor, flips, k: int, offset: float, factor: float) -> torch.Tensor:
    """VoCo's chain on MONAI's (C, x, y, z) layout: flips, Rotate90 in x-y, scale, shift."""
    x = crop_dhw.permute(0, 3, 2, 1)  # [C, D, H, W] -> [C, x, y, z]
    for axis_dhw in range(3):
        if flips[axis_dhw]:
            x = Flip(spatial_axis=2 - axis_dhw)(x)
    if k:
        x = Rotate90(k=k, spatial_axes=(0, 1))(x)
    x = ScaleIntensity(minv=None, maxv=None, factor=factor)(x)
    x = ShiftIntensity(offset=offset)(x)
    return torch.as_tensor(x).permute(0, 3, 2, 1)


def test_matches_monai_crop_by_crop():
    rng = np.random.default_rng(0)
    stack = torch.rand(12, 1, 4, 6, 6, dtype=torch.float32)
    config = AugmentConfig(flip_prob=0.5, rot90_prob=0.7, shift_prob=0.6, scale_prob=0.6)
    params = AugmentParams.draw(12, rng, config)
    assert params.rot90_k.any() and params.flips.any() and (params.offsets != 0).any()
    out = apply_augmentation(stack.clone(), params)
    for i in range(12):
        expected = _monai_reference(
            stack[i],
            params.flips[i],
            int(params.rot90_k[i]),
            float(params.offsets[i]),
            float(params.factors[i]),
        )
        torch.testing.assert_close(out[i], expected, rtol=1e-6, atol=1e-6)


def test_intensity_only_keeps_orientation():
    rng = np.random.default_rng(1)
    params = AugmentParams.draw(
        50, rng, AugmentConfig(flip_prob=1.0, rot90_prob=1.0, shift_prob=1.0), spatial=False
    )
    assert not params.flips.any() and not params.rot90_k.any()
    x = torch.rand(50, 1, 2, 3, 4)
    out = apply_augmentation(x.clone(), params)
    torch.testing.assert_close(
        out - x, torch.from_numpy(params.offsets).float().view(50, 1, 1, 1, 1).expand_as(x)
    )


def test_draw_frequencies_follow_the_config():
    params = AugmentParams.draw(20000, np.random.default_rng(2), AugmentConfig())
    assert params.flips.mean() == pytest.approx(0.2, abs=0.01)
    assert (params.rot90_k > 0).mean() == pytest.approx(0.2, abs=0.01)
    assert set(np.unique(params.rot90_k)) == {0, 1, 2, 3}
    assert (params.offsets != 0).mean() == pytest.approx(0.5, abs=0.015)
    assert np.abs(params.offsets).max() <= 0.1
    assert not params.factors.any()  # scale_prob 0 by default, as VoCo


def test_rot90_on_non_square_is_refused():
    params = AugmentParams(np.zeros((1, 3), bool), np.array([1]), np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="H == W"):
        apply_augmentation(torch.zeros(1, 1, 2, 3, 4), params)
