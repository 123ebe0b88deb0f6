"""patchify3d / unpatchify3d: MAE's 2D patch layout carried to 3D, and its inverse."""

from __future__ import annotations

import pytest
import torch

from fm3d.models.config import EncoderInputError
from fm3d.models.patches import patchify3d, unpatchify3d


def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """facebookresearch/mae, models_mae.py, `MaskedAutoencoderViT.patchify` (any channel count)."""
    n, c, h, w = imgs.shape
    assert h == w and h % p == 0
    h = w = h // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p**2 * c)


@pytest.mark.parametrize("channels", [1, 3])
def test_one_slice_with_patch_depth_one_is_mae_patchify(channels):
    torch.manual_seed(0)
    imgs = torch.randn(2, channels, 12, 12)
    ours = patchify3d(imgs.unsqueeze(2), (1, 4, 4))  # [B, C, 1, H, W]
    torch.testing.assert_close(ours, mae_patchify(imgs, 4), rtol=0, atol=0)


def test_patch_vector_order_is_depth_height_width_channel_and_tokens_are_row_major():
    # Voxel value = its (c, z, y, x) coordinates written as digits: the layout is readable.
    c, z, y, x = torch.meshgrid(
        torch.arange(2), torch.arange(4), torch.arange(2), torch.arange(4), indexing="ij"
    )
    volume = (1000 * c + 100 * z + 10 * y + x).float().unsqueeze(0)  # [1, 2, 4, 2, 4]
    patches = patchify3d(volume, (2, 1, 2))  # grid (2, 2, 2), 4 voxels x 2 channels per patch
    assert patches.shape == (1, 8, 8)
    # Token 5 = grid (1, 0, 1): z 2..3, y 0, x 2..3; vector order (pd, ph, pw, c).
    assert patches[0, 5].tolist() == [202, 1202, 203, 1203, 302, 1302, 303, 1303]
    # Tokens run like x.flatten(2) of the [B, C, d, h, w] grid: w fastest.
    firsts = patches[0, :, 0].tolist()
    assert firsts == [0, 2, 10, 12, 200, 202, 210, 212]


def test_round_trip_is_exact():
    torch.manual_seed(0)
    volume = torch.randn(3, 2, 8, 12, 20)
    patches = patchify3d(volume, (2, 3, 4))
    assert patches.shape == (3, 4 * 4 * 5, 2 * 3 * 4 * 2)
    torch.testing.assert_close(unpatchify3d(patches, (2, 3, 4), (4, 4, 5)), volume, rtol=0, atol=0)


def test_wrong_shapes_are_named():
    with pytest.raises(EncoderInputError, match="not divisible"):
        patchify3d(torch.zeros(1, 1, 8, 8, 9), (2, 2, 2))
    with pytest.raises(EncoderInputError, match=r"\[B, C, D, H, W\]"):
        patchify3d(torch.zeros(1, 8, 8, 8), (2, 2, 2))
    with pytest.raises(EncoderInputError, match="unpatchify3d expects"):
        unpatchify3d(torch.zeros(1, 7, 8), (2, 2, 2), (2, 2, 2))
