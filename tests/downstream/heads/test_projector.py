"""Projectors: M3D spatial pooling against block means computed by hand on the encoder's token grid,
the perceiver resampler's fixed token count and order invariance, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fm3d
from downstream.heads.projector import (
    PerceiverResampler,
    ProjectorConfig,
    ProjectorConfigError,
    SpatialPoolProjector,
    build_projector,
)


def test_spatial_pool_is_block_means_of_the_token_grid_then_the_mlp() -> None:
    torch.manual_seed(0)
    grid, c = (2, 4, 6), 5
    tokens = torch.randn(3, 2 * 4 * 6, c)
    projector = SpatialPoolProjector(c, 7, pool_grid=(1, 2, 3))
    # by hand: tokens are raster order over (d, h, w); pool blocks of 2 x 2 x 2
    volume = tokens.numpy().reshape(3, 2, 4, 6, c)
    blocks = volume.reshape(3, 1, 2, 2, 2, 3, 2, c).mean(axis=(2, 4, 6))  # [B, 1, 2, 3, C]
    pooled = torch.from_numpy(blocks.reshape(3, 6, c))
    expected = projector.mlp(pooled)
    got = projector(tokens, grid)
    assert got.shape == (3, 6, 7)
    assert torch.allclose(got, expected, atol=1e-6)
    # M3D's mlp2x_gelu: Linear -> GELU -> Linear
    assert [type(m).__name__ for m in projector.mlp] == ["Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="do not fill the grid"):
        projector(tokens[:, :-1], grid)


def test_spatial_pool_on_a_real_encoder_output() -> None:
    encoder = fm3d.create_encoder(
        "vit3d_tiny", embed_dim=32, depth=1, num_heads=2, patch_size=8, image_size=(16, 32, 32)
    )
    out = encoder(torch.rand(2, 1, 16, 32, 32))
    config = ProjectorConfig(kind="spatial_pool", pool_grid=(1, 2, 2))
    projector = build_projector(config, encoder.embed_dim, 24)
    assert out.grid == (2, 4, 4) and config.num_tokens == 4
    assert projector(out.tokens, out.grid).shape == (2, 4, 24)


def test_perceiver_gives_a_fixed_token_count_and_ignores_token_order() -> None:
    torch.manual_seed(0)
    resampler = PerceiverResampler(16, 24, num_latents=5, depth=2, heads=4).eval()
    tokens = torch.randn(2, 30, 16)
    out = resampler(tokens)
    assert out.shape == (2, 5, 24)
    assert resampler(torch.randn(2, 7, 16)).shape == (2, 5, 24)  # any number of input tokens
    # attention without positions: permuting the encoder tokens changes nothing
    permuted = tokens[:, torch.randperm(30)]
    assert torch.allclose(resampler(permuted), out, atol=1e-5)
    # ... but the tokens do matter, and gradients reach the learned latents
    assert not torch.allclose(resampler(tokens * 2), out)
    resampler(tokens).sum().backward()
    assert resampler.latents.grad is not None and resampler.latents.grad.abs().sum() > 0
    assert build_projector(ProjectorConfig(kind="perceiver", num_latents=3, heads=2), 16, 8)(
        tokens
    ).shape == (2, 3, 8)


def test_projector_config_errors() -> None:
    with pytest.raises(ProjectorConfigError, match="kind"):
        ProjectorConfig(kind="qformer")
    with pytest.raises(ProjectorConfigError, match="pool_grid"):
        ProjectorConfig(pool_grid=(0, 2, 2))
    with pytest.raises(ProjectorConfigError, match="must divide"):
        PerceiverResampler(30, 8, heads=4)
    assert ProjectorConfig(pool_grid=(2, 4, 4)).num_tokens == int(np.prod((2, 4, 4)))
