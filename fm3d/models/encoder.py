"""The encoder contract every fm3d encoder family implements.

`forward(x: [B, 1, D, H, W]) -> EncoderOutput`. Arrays everywhere in fm3d are indexed
[D, H, W] = (z, y, x) of the RAS-canonical volume (D runs inferior -> superior, H posterior
-> anterior, W left -> right); spacings are given in the same (D, H, W) order, in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncoderOutput:
    """What an encoder returns.

    tokens: [B, N, C] final patch tokens after the final norm (no cls token).
    pooled: [B, C] one embedding per volume (cls token when the encoder has one, else the
        mean of `tokens`).
    grid: (d, h, w) token grid, N = d * h * w.
    hidden: token maps of the layers requested in `forward(..., hidden_layers=...)`, each
        [B, N_i, C_i] (N_i, C_i differ per stage for hierarchical encoders such as Swin).
    hidden_grids: the (d, h, w) grid of each entry of `hidden`.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    grid: tuple[int, int, int]
    hidden: list[torch.Tensor] = field(default_factory=list)
    hidden_grids: list[tuple[int, int, int]] = field(default_factory=list)
