"""The encoder contract every fm3d encoder family implements, and the declaration of a family.

`forward(x: [B, 1, D, H, W]) -> EncoderOutput`. Arrays everywhere in fm3d are indexed
[D, H, W] = (z, y, x) of the RAS-canonical volume (D runs inferior -> superior, H posterior
-> anterior, W left -> right); spacings are given in the same (D, H, W) order, in mm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fm3d.models.config import EncoderConfig


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

    A ViT3D called with `keep=` [B, K] (MAE: only those patch tokens enter the blocks) returns
    `tokens` and every `hidden` entry as [B, K, C], in `keep`'s order, and `pooled` as the cls
    token or the mean of the K kept tokens; `grid` and `hidden_grids` stay the full grid, so
    N = d * h * w counts all patches while K of them are present.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    grid: tuple[int, int, int]
    hidden: list[torch.Tensor] = field(default_factory=list)
    hidden_grids: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class EncoderFamily:
    """What an encoder family declares so that fine-tuning needs no knowledge of its internals.

    Each family module registers one (`fm3d.models.registry.register_family`); the downstream
    strategies and the segmentation task read it instead of guessing from attribute names.

    config_class: the family's config dataclass; its `family` class variable is the family's name.
    width: channels of `tokens` and `pooled` for a config (what a task head reads).
    depth: how many numbered layers a config has; layer ids run from 0 (embeddings) to depth + 1.
    layer_id: (parameter name, depth) -> that parameter's layer id, for layer-wise lr decay;
        None when the family's layers cannot be numbered (layer decay is then refused).
    lora_targets: module-name suffixes (dotted, e.g. "attn.qkv") that get LoRA adapters.
    decoder: the name of its default segmentation decoder in the downstream decoder registry
        (a name, since fm3d never imports downstream); None when it has none.
    """

    config_class: type[EncoderConfig]
    width: Callable[[Any], int]
    depth: Callable[[Any], int]
    layer_id: Callable[[str, int], int] | None = None
    lora_targets: tuple[str, ...] = ()
    decoder: str | None = None

    @property
    def name(self) -> str:
        """The family's name, as written in every config.json (`"family": "vit3d"`)."""
        return self.config_class.family
