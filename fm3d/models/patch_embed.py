"""3D patch embedding: one strided convolution turns a volume into a grid of tokens."""

from __future__ import annotations

import torch
from torch import nn

from fm3d.models.config import EncoderInputError


class PatchEmbed3d(nn.Module):
    """Cut [B, C_in, D, H, W] into non-overlapping (pd, ph, pw) patches and project each to C."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, C, d, h, w] (channels first, so the caller sees the grid)."""
        if x.ndim != 5:
            raise EncoderInputError(f"expected a volume batch [B, C, D, H, W], got shape {tuple(x.shape)}.")
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise EncoderInputError(
                f"input size {spatial} (D, H, W) is not divisible by the patch size {self.patch_size}; "
                "crop or pad the volume to a multiple of the patch."
            )
        return self.proj(x)
