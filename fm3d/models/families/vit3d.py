"""ViT3D: a plain vision transformer over 3D patches, with parameter names like timm/DINOv2.

Names matter: peers' checkpoints (MONAI ViT/UNETR, M3D-CLIP) are mapped onto them, so
`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1,norm2,
mlp.fc1,mlp.fc2,ls2}` and `norm` are a contract. The cls token gets no position embedding
(as in MONAI's ViT); `pos_embed` covers the patch tokens of the configured grid and is
resampled trilinearly for any other grid.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fm3d.models.block import Block
from fm3d.models.config import EncoderConfigError, EncoderInputError, ViT3DConfig
from fm3d.models.encoder import EncoderFamily, EncoderOutput
from fm3d.models.patch_embed import PatchEmbed3d
from fm3d.models.pos_embed import resize_pos_embed, sincos_pos_embed_3d
from fm3d.models.registry import register_encoder, register_family

_BLOCK_PARAM = re.compile(r"^blocks\.(\d+)\.")


class ViT3D(nn.Module):
    """A 3D ViT encoder: volume [B, C_in, D, H, W] -> `EncoderOutput` of patch tokens."""

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = dim = VIT3D.width(config)
        self.patch_embed = PatchEmbed3d(config.in_chans, dim, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.cls_token else None
        n_patches = config.grid[0] * config.grid[1] * config.grid[2]
        if config.pos_embed == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_patches, dim))
        else:
            # A buffer, not a parameter, and not saved: it is a function of the config alone.
            self.register_buffer("pos_embed", sincos_pos_embed_3d(config.grid, dim), persistent=False)
        # Stochastic depth grows linearly with depth, 0 for the first block.
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                qk_norm=config.qk_norm,
                layer_scale_init=config.layer_scale_init,
                norm_eps=config.norm_eps,
                drop=config.drop_rate,
                attn_drop=config.attn_drop_rate,
                drop_path=rate,
                attention_backend=config.attention_backend,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT init: truncated normal 0.02 for tokens and linears, zero biases.
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _hidden_indices(self, hidden_layers: Any) -> list[int]:
        requested = self.config.hidden_layers if hidden_layers is None else hidden_layers
        indices = []
        depth = self.config.depth
        for index in requested:
            if not -depth <= index < depth:
                raise EncoderConfigError(
                    f"hidden layer {index} is out of range for {self.config.name} with {depth} blocks."
                )
            indices.append(index % depth)
        return indices

    def forward(
        self,
        x: torch.Tensor,
        hidden_layers: Any = None,
        *,
        keep: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode x [B, C_in, D, H, W]; `hidden_layers` (0-based, negatives allowed) picks blocks to return.

        `hidden` holds the patch tokens after each requested block, before the final norm,
        in the order requested; None means `config.hidden_layers`.

        Two ways to hide patches, for masked-image pretraining (at most one per call):
        - `keep` [B, K] int64: indices (row-major over the (d, h, w) grid, the order of
          `x.flatten(2)`) of the only patch tokens the blocks see (MAE). Only the kept patches
          are projected, each given its own position embedding; `tokens` and `hidden` come back [B, K, C] in
          `keep`'s order, `pooled` is the cls token or the mean of the kept tokens, `grid`
          stays the full grid.
        - `token_mask` [B, N] bool with `mask_token` [C] (a parameter the caller owns): the
          patch embeddings where the mask is True are replaced by `mask_token` before the
          position embedding is added, as DINOv2's `prepare_tokens_with_masks` (iBOT).
          `mask_token` alone is ignored, so a caller can pass its parameter for every view.
        """
        wanted = self._hidden_indices(hidden_layers)
        grid = self.patch_embed.grid(tuple(x.shape[2:]))
        self._check_masking(x.shape[0], grid, keep, token_mask, mask_token)
        pos_embed = resize_pos_embed(self.pos_embed, self.config.grid, grid)  # [1, N, C]
        if keep is not None:
            # Only the kept patches are projected, and given their positions.
            x = self.patch_embed(x, keep=keep)  # [B, K, C]
            index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = x + pos_embed.to(x.dtype).expand(x.shape[0], -1, -1).gather(1, index)
        else:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, C]
            if token_mask is not None:
                # torch.where, not indexing: the mask token stays in the graph (a zero gradient
                # when nothing is masked), so DDP sees it used in every step.
                x = torch.where(token_mask.unsqueeze(-1), mask_token.to(x.dtype), x)
            x = x + pos_embed.to(x.dtype)
        prefix = 0
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            prefix = 1
        use_checkpoint = self.config.grad_checkpointing and torch.is_grad_enabled()
        kept: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
            if index in wanted:
                kept[index] = x[:, prefix:]
        x = self.norm(x)
        tokens = x[:, prefix:]
        pooled = x[:, 0] if self.cls_token is not None else tokens.mean(dim=1)
        return EncoderOutput(
            tokens=tokens,
            pooled=pooled,
            grid=grid,
            hidden=[kept[i] for i in wanted],
            hidden_grids=[grid] * len(wanted),
        )

    def _check_masking(
        self,
        batch: int,
        grid: tuple[int, int, int],
        keep: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        mask_token: torch.Tensor | None,
    ) -> None:
        """Refuse `keep` / `token_mask` / `mask_token` that do not fit B inputs of this token grid."""
        n_tokens, dim = grid[0] * grid[1] * grid[2], self.embed_dim
        if keep is not None and token_mask is not None:
            raise EncoderInputError(
                "ViT3D.forward got both keep= and token_mask=; drop tokens (keep, MAE) or replace them "
                "(token_mask, iBOT), not both in one call."
            )
        if keep is not None:
            if keep.dtype != torch.long or keep.ndim != 2 or keep.shape[0] != batch:
                raise EncoderInputError(
                    f"keep= must be an int64 tensor [B={batch}, K] of patch-token indices; got "
                    f"{keep.dtype} of shape {tuple(keep.shape)}."
                )
            # One host sync per call; an out-of-range index would otherwise be a device assert.
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n_tokens):
                raise EncoderInputError(
                    f"keep= holds indices outside [0, {n_tokens}), the patch tokens of this input's grid."
                )
        if token_mask is not None:
            if mask_token is None:
                raise EncoderInputError(
                    "ViT3D.forward got token_mask= without mask_token=; pass the [C] mask token "
                    "that replaces the masked patch embeddings."
                )
            if token_mask.dtype != torch.bool or tuple(token_mask.shape) != (batch, n_tokens):
                raise EncoderInputError(
                    f"token_mask= must be a bool tensor [B={batch}, N={n_tokens}] (N: patch tokens of this "
                    f"input's grid); got {token_mask.dtype} of shape {tuple(token_mask.shape)}."
                )
            if tuple(mask_token.shape) != (dim,) or not mask_token.is_floating_point():
                raise EncoderInputError(
                    f"mask_token= must be a float tensor [C={dim}]; got {mask_token.dtype} of shape "
                    f"{tuple(mask_token.shape)}."
                )


def vit_layer_id(param_name: str, depth: int) -> int:
    """The layer of a parameter for layer-wise LR decay: 0 embeddings, i+1 for blocks.i, depth+1 norm."""
    match = _BLOCK_PARAM.match(param_name)
    if match:
        return int(match.group(1)) + 1
    if param_name.startswith("norm."):
        return depth + 1
    return 0


VIT3D = register_family(
    EncoderFamily(
        config_class=ViT3DConfig,
        width=lambda config: config.embed_dim,
        depth=lambda config: config.depth,
        layer_id=vit_layer_id,
        lora_targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        decoder="unetr",
    )
)


def _sized(name: str, embed_dim: int, depth: int, num_heads: int) -> None:
    base = ViT3DConfig(name=name, embed_dim=embed_dim, depth=depth, num_heads=num_heads)

    @register_encoder(name)
    def factory(**overrides: Any) -> ViT3D:
        return ViT3D(ViT3DConfig.with_overrides(base, **overrides))

    factory.__name__ = name
    factory.__doc__ = f"{name}: ViT3D with {embed_dim} channels, {depth} blocks, {num_heads} heads."


# Tiny is for tests and demos: 192 channels (a multiple of 6 for sin-cos), 4 blocks, 3 heads of 64.
_sized("vit3d_tiny", 192, 4, 3)
_sized("vit3d_small", 384, 12, 6)
_sized("vit3d_base", 768, 12, 12)
_sized("vit3d_large", 1024, 24, 16)
