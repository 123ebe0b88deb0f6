"""MAE masked autoencoding for 3D: encode the visible patches only, reconstruct the masked ones' voxels.

Follows He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), as its
reference code does (`facebookresearch/mae`, `models_mae.py`, read for facts; the code here is
fm3d's own): `forward_encoder` (patch and position embedding of every patch, then only the
visible ones enter the blocks; fm3d's `ViT3D.forward(keep=...)`), `forward_decoder` (a linear
embedding of the encoder's tokens to the decoder width, a learnable mask token in every masked
position, the full sequence back in grid order, a fixed sin-cos position embedding, a few
transformer blocks, a norm and a linear prediction of each patch's voxels; the encoder's cls
token rides along with no position, as MAE's zero cls entry gives it) and `forward_loss`
(per-patch MSE against the patch's voxels, normalised per patch when `norm_pix_loss`, averaged
over the masked patches only).

Where fm3d differs, and why:
- The mask comes from the data (`mae` view: `mae_mask` [B, T] bool, True = masked, the same
  count in every row) instead of `random_masking` inside the model, so it is drawn from each
  sample's seeded generator and reproducible across worker counts and resumes.
- Patches are 3D and a patch vector is ordered (pd, ph, pw, c) (`fm3d.models.patches`), MAE's
  (p, q, c) with the depth axis in front; MAE is 2D.
- The encoder is the shared one (its own init, cls token, learnable or sin-cos position
  embedding per its config); the objective owns the decoder only. The decoder's position
  table is built for the encoder's configured grid and resampled like the encoder's for other
  crop sizes.
- Decoder init follows MAE (xavier-uniform linears, zero biases, mask token N(0, 0.02)).

The decoder runs in the autocast dtype; its prediction is cast to float32 before the loss, so
the loss (and the per-patch normalisation of the target) is float32 under bf16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from fm3d.models.block import Block
from fm3d.models.encoder import EncoderOutput
from fm3d.models.families.vit3d import ViT3D
from fm3d.models.patches import patchify3d
from fm3d.models.pos_embed import resize_pos_embed, sincos_pos_embed_3d
from pretrain.objectives.base import Objective, ObjectiveError, masked_mean, require

_NORM_PIX_EPS = 1e-6  # MAE's forward_loss: (t - mean) / (var + 1e-6) ** 0.5


def visible_first(mask: torch.Tensor) -> torch.Tensor:
    """Token indices [B, N] with each row's visible tokens first, then its masked ones, each ascending.

    With K visible tokens per row, `[:, :K]` is what the encoder keeps (in grid order).
    """
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)


class MAEObjective(Objective):
    """Masked autoencoding of 3D patches with a light transformer decoder (MAE).

    Args:
        embed_dim: the encoder's token width.
        decoder_dim: the decoder's width; a multiple of 6 (three axes of sin and cos in the
            fixed position table) and of `decoder_heads`.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        norm_pix_loss: normalise each target patch by its own mean and variance (MAE's
            best-performing target, on by default here).

    Default decoder: 192 wide, 2 blocks, 6 heads of 32 channels (MAE's 512 / 16 head width).
    MAE's ViT decoder is 512 x 8 and MONAI's 3D `MaskedAutoEncoderViT` defaults to 384 x 4.
    MAE's ablation (He et al. 2022, Table 1a) keeps fine-tuning accuracy at 84.9 from decoder
    depth 2 up, while linear probing gains with depth (70.0 at 2, 73.5 at 8). In 3D the
    decoder and its prediction of every patch's voxels (4096 at 16^3) run on every token of a
    crop, so the decoder is kept light: with vit3d_small at 256 tokens an MAE step takes 0.39x
    the time and activation memory of the full-token encoder step (4 blocks: 0.43x and 0.47x),
    with vit3d_base less; with vit3d_tiny (4 blocks) the decoder and prediction cost as much as
    the encoder and MAE saves nothing (`benchmarks/objectives.py`, docs/objectives.md). Raise
    `decoder_depth` where linear-probing quality matters more than step time.

    Batch: `mae_image` [B, C_in, D, H, W] float and `mae_mask` [B, T] bool (True = masked, the
    same count per row, T = patch tokens of the encoder's grid for that size), from the `mae`
    view. The objective encodes them itself (`encode`), so `views` is empty.
    Metrics: `masked_share` (masked tokens over all) and `visible_tokens` (per volume).
    """

    name = "mae"
    views = ()
    batch_keys = ("mae_image", "mae_mask")

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int = 192,
        decoder_depth: int = 2,
        decoder_heads: int = 6,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if decoder_dim <= 0 or decoder_dim % 6 or decoder_dim % decoder_heads:
            raise ObjectiveError(
                f"MAE decoder_dim {decoder_dim} must be a positive multiple of 6 (the 3D sin-cos position "
                f"table) and of decoder_heads {decoder_heads}; e.g. 192 with 6 heads or 384 with 12"
            )
        if decoder_depth < 1:
            raise ObjectiveError(f"MAE decoder_depth must be at least 1, got {decoder_depth}")
        self.decoder_dim = decoder_dim
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        # Set by bind(encoder): they depend on the encoder's patching, which embed_dim does not say.
        self.decoder_pred: nn.Linear | None = None
        self.patch_size: tuple[int, int, int] | None = None
        self.in_chans = 0
        self.grid: tuple[int, int, int] = (0, 0, 0)
        self.has_cls = False
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def bind(self, encoder: nn.Module) -> None:
        """Build the prediction layer and position table for the encoder's patches; keep plain values only."""
        if not isinstance(encoder, ViT3D):
            raise ObjectiveError(
                f"the MAE objective needs a ViT3D encoder (it runs the blocks on the visible patches "
                f"only, ViT3D.forward(keep=...)); got {type(encoder).__name__}. Choose a vit3d_* encoder"
            )
        config = encoder.config
        geometry = (tuple(config.patch_size), config.in_chans, tuple(config.grid), bool(config.cls_token))
        if self.decoder_pred is not None:
            if geometry != (self.patch_size, self.in_chans, self.grid, self.has_cls):
                raise ObjectiveError(
                    "this MAE objective is already bound to an encoder with another patch size, channel "
                    "count, grid or cls token; build a new objective for the new encoder"
                )
            return
        self.patch_size, self.in_chans, self.grid, self.has_cls = geometry
        voxels = math.prod(self.patch_size) * self.in_chans
        if self.norm_pix_loss and voxels < 2:
            raise ObjectiveError(
                "norm_pix_loss normalises each patch by its variance, which needs at least 2 voxels per "
                f"patch; patch_size {self.patch_size} with {self.in_chans} channel(s) has {voxels}"
            )
        device = self.decoder_embed.weight.device
        self.decoder_pred = nn.Linear(self.decoder_dim, voxels, device=device)
        _init_linear(self.decoder_pred)
        # A function of the config alone: a buffer, not saved (as the encoder's sin-cos table).
        table = sincos_pos_embed_3d(self.grid, self.decoder_dim).to(device)  # [1, N, Cd]
        self.register_buffer("decoder_pos_embed", table, persistent=False)

    def encode(self, encoder: nn.Module, batch: Mapping[str, object]) -> dict[str, EncoderOutput]:
        """The encoder on the visible patches of `mae_image` only: {"mae_visible": [B, K, C] tokens}."""
        image, mask = self._inputs(batch)
        keep = visible_first(mask)[:, : self._visible_count(mask)]  # [B, K]
        return {"mae_visible": encoder(image, keep=keep)}

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        image, mask = self._inputs(batch)
        if "mae_visible" not in encoded:
            raise ObjectiveError(
                "the MAE objective reads encoded['mae_visible'], which its encode(encoder, batch) makes; "
                "merge objective.encode(...) into the encodings it gets (the PretrainModule does)"
            )
        visible = encoded["mae_visible"]
        prediction = self.decode(visible, mask)
        loss = reconstruction_loss(prediction, image, mask, self.patch_size, self.norm_pix_loss)
        metrics = {
            "masked_share": mask.float().mean().detach(),
            "visible_tokens": torch.tensor(float(visible.tokens.shape[1]), device=loss.device),
        }
        return loss, metrics

    def decode(self, visible: EncoderOutput, mask: torch.Tensor) -> torch.Tensor:
        """Predicted voxels of every patch [B, N, P * C_in] (float32) from the visible tokens [B, K, C].

        MAE's `forward_decoder`: the visible tokens go back to their grid positions (the
        ascending unmasked indices of each row of `mask` [B, N], the order `encode` kept them
        in), every other position gets the mask token.
        """
        batch_size, num_tokens = mask.shape
        keep = visible_first(mask)[:, : visible.tokens.shape[1]]  # [B, K]
        x = self.decoder_embed(visible.tokens)  # [B, K, Cd]
        full = self.mask_token.to(x.dtype).expand(batch_size, num_tokens, -1)
        x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)  # [B, N, Cd]
        x = x + resize_pos_embed(self.decoder_pos_embed, self.grid, visible.grid).to(x.dtype)
        if self.has_cls:
            x = torch.cat([self.decoder_embed(visible.pooled).unsqueeze(1), x], dim=1)  # [B, 1 + N, Cd]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, int(self.has_cls) :]
        return self.decoder_pred(x).float()  # [B, N, P * C_in]

    def _inputs(self, batch: Mapping[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
        """`mae_image` [B, C_in, D, H, W] and `mae_mask` [B, N] bool, checked against the bound encoder."""
        if self.patch_size is None:
            raise ObjectiveError(
                "the MAE objective was not bound to an encoder; call objective.bind(encoder) once after "
                "building it (the PretrainModule does)"
            )
        image = require(batch, "mae_image", self.name)
        mask = require(batch, "mae_mask", self.name)
        if not isinstance(image, torch.Tensor) or image.ndim != 5 or image.shape[1] != self.in_chans:
            raise ObjectiveError(
                f"batch['mae_image'] must be a tensor [B, {self.in_chans}, D, H, W]; got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        spatial = tuple(image.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ObjectiveError(
                f"mae_image size {spatial} is not divisible by the encoder's patch size {self.patch_size}; "
                "set data.views.mae.size to a multiple of it"
            )
        num_tokens = math.prod(s // p for s, p in zip(spatial, self.patch_size, strict=True))
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
            raise ObjectiveError(
                f"batch['mae_mask'] must be a bool tensor [B, T] (True = masked); got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}"
            )
        if tuple(mask.shape) != (image.shape[0], num_tokens):
            raise ObjectiveError(
                f"batch['mae_mask'] has shape {tuple(mask.shape)} but mae_image {tuple(image.shape)} with "
                f"the encoder's patch size {self.patch_size} has {num_tokens} tokens per volume; set "
                "data.views.mae.patch_size to the encoder's patch_size"
            )
        return image, mask.to(image.device)

    @staticmethod
    def _visible_count(mask: torch.Tensor) -> int:
        """K, the visible tokens of every row; refuses rows that differ and masks of ratio 0 or 1."""
        masked = mask.sum(dim=1)  # [B]
        low, high = int(masked.min()), int(masked.max())
        if low != high:
            raise ObjectiveError(
                f"mae_mask rows mask between {low} and {high} tokens; MAE stacks the visible tokens of a "
                "batch, so every row needs the same count (the mae view draws exactly "
                "round(mask_ratio * T) per volume)"
            )
        if low in (0, mask.shape[1]):
            raise ObjectiveError(
                f"mae_mask masks {low} of {mask.shape[1]} tokens: nothing to reconstruct or nothing to see; "
                "set data.views.mae.mask_ratio strictly between 0 and 1 (MAE: 0.75)"
            )
        return mask.shape[1] - low


def reconstruction_loss(
    prediction: torch.Tensor,
    image: torch.Tensor,
    mask: torch.Tensor,
    patch_size: tuple[int, int, int],
    norm_pix_loss: bool = True,
) -> torch.Tensor:
    """MAE's `forward_loss` in 3D: mean over masked patches of the per-patch MSE, float32.

    prediction [B, N, P * C] against the patches of image [B, C, D, H, W] (`patchify3d` order);
    mask [B, N] bool, True = masked. With `norm_pix_loss` each target patch t becomes
    (t - mean(t)) / sqrt(var(t) + 1e-6), var unbiased as MAE's `torch.var` default.
    """
    target = patchify3d(image.float(), patch_size)  # [B, N, P * C]
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + _NORM_PIX_EPS) ** 0.5
    per_patch = (prediction.float() - target).pow(2).mean(dim=-1)  # [B, N]
    return masked_mean(per_patch, mask)


def _init_linear(module: nn.Module) -> None:
    """MAE's decoder init: xavier-uniform weights and zero biases for linears (JAX ViT's choice)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
