"""Swin3D: the encoder half of MONAI's SwinUNETR(-v2), the architecture of VoCo's published weights.

The submodules keep MONAI's names (`swinViT`, `encoder1`..`encoder4`, `encoder10`) so VoCo and
SwinUNETR checkpoints load by key. `hidden` offers the five skip maps SwinUNETR's decoder
consumes, so a downstream SwinUNETR-style decoder can reuse them:

    index  map                          channels          grid
    0      encoder1(x)                  feature_size      D, H, W
    1      encoder2(swin stage 0)       feature_size      D/2
    2      encoder3(swin stage 1)       2*feature_size    D/4
    3      encoder4(swin stage 2)       4*feature_size    D/8
    4      swin stage 3 (raw)           8*feature_size    D/16
The tokens are encoder10(swin stage 4): 16*feature_size channels on the D/32 grid.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from fm3d.models.config import EncoderConfigError, EncoderInputError, Swin3DConfig
from fm3d.models.encoder import EncoderFamily, EncoderOutput
from fm3d.models.registry import register_encoder, register_family

NUM_SKIPS = 5
_STAGE_PARAM = re.compile(r"^swinViT\.layers(\d)")


def _as_tokens(feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[B, C, d, h, w] -> ([B, d*h*w, C], (d, h, w))."""
    return feature_map.flatten(2).transpose(1, 2), tuple(feature_map.shape[2:])


class Swin3D(nn.Module):
    """SwinUNETR-v2's encoder behind the fm3d contract; inputs must be divisible by 32 per axis."""

    def __init__(self, config: Swin3DConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = SWIN3D.width(config)
        # Build MONAI's network and keep its encoder modules, so names and init are MONAI's own.
        full = SwinUNETR(
            in_channels=config.in_chans,
            out_channels=1,
            patch_size=config.patch_size,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            qkv_bias=config.qkv_bias,
            mlp_ratio=config.mlp_ratio,
            feature_size=config.feature_size,
            norm_name=config.norm_name,
            drop_rate=config.drop_rate,
            attn_drop_rate=config.attn_drop_rate,
            dropout_path_rate=config.drop_path_rate,
            normalize=config.normalize,
            use_checkpoint=config.grad_checkpointing,
            spatial_dims=3,
            use_v2=config.use_v2,
        )
        self.swinViT = full.swinViT
        self.encoder1 = full.encoder1
        self.encoder2 = full.encoder2
        self.encoder3 = full.encoder3
        self.encoder4 = full.encoder4
        self.encoder10 = full.encoder10
        self._divisor = config.patch_size * 2 ** len(config.depths)

    def forward(self, x: torch.Tensor, hidden_layers: Any = None) -> EncoderOutput:
        """Encode x [B, C_in, D, H, W]; `hidden_layers` picks skip maps 0..4 (see the module docstring)."""
        if x.ndim != 5 or any(s % self._divisor for s in x.shape[2:]):
            raise EncoderInputError(
                f"{self.config.name} needs [B, C, D, H, W] with D, H, W divisible by {self._divisor}; "
                f"got shape {tuple(x.shape)}. Crop or pad the volume."
            )
        requested = self.config.hidden_layers if hidden_layers is None else hidden_layers
        wanted = []
        for index in requested:
            if not -NUM_SKIPS <= index < NUM_SKIPS:
                raise EncoderConfigError(f"swin3d hidden layer {index} is out of range (0..{NUM_SKIPS - 1}).")
            wanted.append(index % NUM_SKIPS)
        stages = self.swinViT(x, self.config.normalize)  # 5 maps [B, f*2^k, D/2^(k+1), ...]
        skips = {
            0: lambda: self.encoder1(x),
            1: lambda: self.encoder2(stages[0]),
            2: lambda: self.encoder3(stages[1]),
            3: lambda: self.encoder4(stages[2]),
            4: lambda: stages[3],
        }
        computed = {index: _as_tokens(skips[index]()) for index in sorted(set(wanted))}
        tokens, grid = _as_tokens(self.encoder10(stages[4]))
        return EncoderOutput(
            tokens=tokens,
            pooled=tokens.mean(dim=1),
            grid=grid,
            hidden=[computed[i][0] for i in wanted],
            hidden_grids=[computed[i][1] for i in wanted],
        )


def swin_layer_id(param_name: str, depth: int) -> int:
    """The layer of a parameter for layer-wise LR decay: 0 patch embedding, k for Swin stage k,
    depth + 1 for the convolutional blocks that follow the stages."""
    match = _STAGE_PARAM.match(param_name)
    if match:
        return int(match.group(1))
    if param_name.startswith("swinViT."):
        return 0
    return depth + 1


# MONAI's Swin blocks call their MLP projections linear1/linear2; the patch embedding's `proj`
# is a convolution, which the dotted "attn.proj" leaves alone.
SWIN3D = register_family(
    EncoderFamily(
        config_class=Swin3DConfig,
        width=lambda config: 16 * config.feature_size,
        depth=lambda config: len(config.depths),
        layer_id=swin_layer_id,
        lora_targets=("attn.qkv", "attn.proj", "mlp.linear1", "mlp.linear2"),
        decoder="swin_unetr",
    )
)


def _sized(name: str, feature_size: int) -> None:
    base = Swin3DConfig(name=name, feature_size=feature_size)

    @register_encoder(name)
    def factory(**overrides: Any) -> Swin3D:
        return Swin3D(Swin3DConfig.with_overrides(base, **overrides))

    factory.__name__ = name
    factory.__doc__ = f"{name}: SwinUNETR-v2 encoder with feature_size {feature_size}."


# base, large and huge are VoCo's "B", "L" and "H" (feature_size 48, 96, 192); tiny (12) is for
# tests and demos.
_sized("swin3d_tiny", 12)
_sized("swin3d_base", 48)
_sized("swin3d_large", 96)
_sized("swin3d_huge", 192)
