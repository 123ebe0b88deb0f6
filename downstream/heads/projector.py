"""Projectors from encoder tokens to a fixed number of language-model input embeddings.

- `SpatialPoolProjector` (M3D-LaMed's "spatial pooling" projector): the [B, N, C] tokens are put
  back on their (d, h, w) grid, average-pooled to `pool_grid` (adaptive, so any input grid
  works) and each pooled token goes through an MLP (Linear -> GELU -> Linear, M3D's
  `mlp2x_gelu`) into the LM's width: d' * h' * w' image tokens, in (d, h, w) raster order.
- `PerceiverResampler` (Flamingo): `num_latents` learned queries cross-attend to the tokens
  (keys/values = tokens and latents, pre-norm), then a feed-forward block, `depth` times; a
  final norm and a linear map into the LM's width. The token count is fixed whatever the grid.

`build_projector(config, in_dim, out_dim)` makes either from a `ProjectorConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fm3d.errors import Fm3dError

PROJECTORS = ("spatial_pool", "perceiver")


class ProjectorConfigError(Fm3dError, ValueError):
    """Projector settings that cannot work (unknown kind, heads not dividing the width, empty grid)."""


@dataclass
class ProjectorConfig:
    """Which projector and its size.

    kind: "spatial_pool" (M3D) or "perceiver" (Flamingo resampler).
    pool_grid: spatial_pool's output grid (d, h, w); d * h * w image tokens.
    mlp_depth: spatial_pool's MLP layers (2 = Linear, GELU, Linear).
    num_latents: perceiver's output tokens.
    depth, heads: perceiver layers and attention heads (heads must divide the encoder width).
    """

    kind: Literal["spatial_pool", "perceiver"] = "spatial_pool"
    pool_grid: tuple[int, int, int] = (2, 4, 4)
    mlp_depth: int = 2
    num_latents: int = 32
    depth: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise ProjectorConfigError(f"projector kind must be one of {PROJECTORS}, got {self.kind!r}")
        self.pool_grid = tuple(int(g) for g in self.pool_grid)
        if len(self.pool_grid) != 3 or min(self.pool_grid) < 1 or self.mlp_depth < 1 or self.num_latents < 1:
            raise ProjectorConfigError(
                f"pool_grid must be 3 positive sizes and mlp_depth/num_latents >= 1; got {self.pool_grid}, "
                f"{self.mlp_depth}, {self.num_latents}"
            )

    @property
    def num_tokens(self) -> int:
        """How many LM input embeddings the projector produces."""
        return math.prod(self.pool_grid) if self.kind == "spatial_pool" else self.num_latents


def mlp(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """`depth` linear layers with GELU between them (depth 2 = M3D's mlp2x_gelu)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class SpatialPoolProjector(nn.Module):
    """Adaptive average pooling of the token grid to `pool_grid`, then an MLP per token."""

    def __init__(
        self, in_dim: int, out_dim: int, pool_grid: tuple[int, int, int], mlp_depth: int = 2
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(tuple(pool_grid))
        self.mlp = mlp(in_dim, out_dim, mlp_depth)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, C] tokens on `grid` -> [B, prod(pool_grid), out_dim]."""
        b, n, c = tokens.shape
        if math.prod(grid) != n:
            raise ProjectorConfigError(f"{n} tokens do not fill the grid {tuple(grid)}")
        volume = tokens.transpose(1, 2).reshape(b, c, *grid)  # [B, C, d, h, w]
        pooled = self.pool(volume).flatten(2).transpose(1, 2)  # [B, d'h'w', C]
        return self.mlp(pooled)


class _PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_latents, self.norm_tokens = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.feed_forward = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        )

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        query = self.norm_latents(latents)
        # Flamingo attends over the tokens and the latents themselves.
        context = torch.cat([self.norm_tokens(tokens), query], dim=1)
        latents = latents + self.attention(query, context, context, need_weights=False)[0]
        return latents + self.feed_forward(latents)


class PerceiverResampler(nn.Module):
    """`num_latents` learned queries cross-attending to the encoder tokens (see module docstring)."""

    def __init__(
        self, in_dim: int, out_dim: int, num_latents: int = 32, depth: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        if in_dim % heads:
            raise ProjectorConfigError(f"perceiver heads ({heads}) must divide the encoder width ({in_dim})")
        self.latents = nn.Parameter(torch.randn(num_latents, in_dim) * in_dim**-0.5)
        self.layers = nn.ModuleList(_PerceiverLayer(in_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(in_dim)
        self.out = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """[B, N, C] tokens (any N; `grid` unused) -> [B, num_latents, out_dim]."""
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, tokens)
        return self.out(self.norm(latents))


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The projector `config` describes, from encoder width `in_dim` to LM width `out_dim`."""
    if config.kind == "spatial_pool":
        return SpatialPoolProjector(in_dim, out_dim, config.pool_grid, config.mlp_depth)
    return PerceiverResampler(in_dim, out_dim, config.num_latents, config.depth, config.heads)
