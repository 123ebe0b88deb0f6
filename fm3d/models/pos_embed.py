"""Position embeddings for a 3D token grid: fixed sin-cos tables and trilinear resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """A fixed sin-cos embedding [1, d*h*w, dim] for a (d, h, w) grid, flattened D-major like the tokens.

    Channels hold dim // 6 frequencies of sin and cos per axis, in MONAI's
    `build_sincos_position_embedding` order (grid axes 1, 0, 2: H, D, W), so MONAI ViTs
    pretrained with sin-cos map onto it unchanged. When dim is not a multiple of 6 (1024 for
    vit3d_large) the last dim % 6 channels stay zero instead of refusing the size.
    """
    per_axis = dim // 6
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float64) / max(per_axis, 1))
    axes = [torch.arange(n, dtype=torch.float64) for n in grid]
    gd, gh, gw = torch.meshgrid(*axes, indexing="ij")  # each [d, h, w]
    parts = []
    for coord in (gh, gd, gw):
        angles = coord.reshape(-1, 1) * omega  # [N, per_axis]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)  # [N, 6 * per_axis]
    table = F.pad(table, (0, dim - table.shape[1]))
    return table.float().unsqueeze(0)


def resize_pos_embed(
    pos_embed: torch.Tensor, from_grid: tuple[int, int, int], to_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Trilinearly resample a [1, N, C] grid embedding from `from_grid` to `to_grid`."""
    if tuple(from_grid) == tuple(to_grid):
        return pos_embed
    channels = pos_embed.shape[-1]
    volume = pos_embed.reshape(1, *from_grid, channels).permute(0, 4, 1, 2, 3)  # [1, C, d, h, w]
    # Interpolate in fp32: bf16 trilinear on CPU is slow and loses the fine sin-cos structure.
    resized = F.interpolate(volume.float(), size=tuple(to_grid), mode="trilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(pos_embed.dtype)  # [1, N', C]
