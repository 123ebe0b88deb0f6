"""MONAI ViT / UNETR weights -> `vit3d_*`.

MONAI's `ViT` (and UNETR, which holds one as `vit.`) names its parameters
`patch_embedding.{patch_embeddings,position_embeddings}`, `cls_token`,
`blocks.{i}.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,mlp.linear2}` and `norm`. Its fused
qkv is laid out (3, heads, head_dim) like fm3d's, its MLP uses exact GELU, its LayerNorms eps
1e-5, and its cls token gets no position embedding, so the mapping is a renaming, plus one
reshape for the "perceptron" patch embedding (einops Rearrange + Linear, kept by MONAI < 1.4
as `patch_embeddings.1.*`), which is the same linear map as fm3d's strided Conv3d.

Layouts by version: MONAI < 1.4 has nothing else; 1.4 and 1.5 create an unused
`blocks.{i}.cross_attn.*` and `blocks.{i}.norm_cross_attn.*` in every block; 1.6 keeps only the
unused `norm_cross_attn`. Those are MONAI placeholders (the ViT never calls them) and are set
aside, as are UNETR's decoder and a classification head.

What the file cannot tell: the number of heads (a hint, default embed_dim / 64, as ViT-B/L/S),
the grid when the patch count is not a cube (an `image_size` hint), the patch of a perceptron
embedding whose size is not a cube (a `patch_size` hint), and the spacing, HU window and
intensity range the network was trained with. fm3d does not transpose weights, so the input
spec's axis order is MONAI's "xyz" (`LoadImage` + `Orientation("RAS")` arrays) and its
image_size the trained grid in those axes; the three unrecorded fields keep fm3d's defaults
and are listed in `config.source["spec_assumed"]` (set them with
`fm3d.preprocessing(encoder.config.input_spec.replace(...))`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fm3d.models.adapters.formats import register_peer_format
from fm3d.models.adapters.matching import PeerConversion, PeerWeightsError, find_prefix, split_prefix
from fm3d.models.adapters.specs import peer_preprocessing

logger = logging.getLogger(__name__)

FORMAT = "monai_vit"
ANCHOR = "patch_embedding.position_embeddings"
CONV_PATCH = "patch_embedding.patch_embeddings.weight"
PERCEPTRON_PATCH = "patch_embedding.patch_embeddings.1.weight"
# MONAI LayerNorm default.
MONAI_NORM_EPS = 1e-5
# MONAI's axis order; the spec fields MONAI weights do not record keep fm3d's defaults (`assumed`).
PREPROCESSING = peer_preprocessing(FORMAT)

# (peer pattern, fm3d replacement) for every tensor that is a plain renaming.
_RENAMES = [
    (re.compile(r"^cls_token$"), "cls_token"),
    (re.compile(r"^patch_embedding\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^patch_embedding\.patch_embeddings(?:\.1)?\.bias$"), "patch_embed.proj.bias"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"blocks.\1.attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.out_proj\.(weight|bias)$"), r"blocks.\1.attn.proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.linear1\.(weight|bias)$"), r"blocks.\1.mlp.fc1.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.linear2\.(weight|bias)$"), r"blocks.\1.mlp.fc2.\2"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
]
# Inside the ViT but not part of the encoder: MONAI's unused cross-attention placeholders and
# the classification head.
_SET_ASIDE = re.compile(r"^(blocks\.\d+\.(cross_attn|norm_cross_attn)\.|classification_head\.)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")

# Registered ViT3D sizes by (embed_dim, depth), so a standard-size file gets the standard name.
_NAMES = {
    (192, 4): "vit3d_tiny",
    (384, 12): "vit3d_small",
    (768, 12): "vit3d_base",
    (1024, 24): "vit3d_large",
}


def detect(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of a MONAI ViT position embedding (any prefix), or None."""
    return next((f"key '{key}'" for key in state if key.endswith(ANCHOR)), None)


def _cube_root(n: int) -> int | None:
    root = round(n ** (1 / 3))
    return root if root**3 == n else None


def _triple(value: Any) -> tuple[int, int, int]:
    return (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)


def _patch_weight(
    vit: Mapping[str, torch.Tensor], embed_dim: int, in_chans: int, patch_size: Any, path: Path
) -> tuple[torch.Tensor, tuple[int, int, int], str]:
    """The Conv3d patch weight [C, C_in, pd, ph, pw], the patch size, and MONAI's proj_type."""
    if CONV_PATCH in vit:
        weight = vit[CONV_PATCH]
        return weight, tuple(weight.shape[2:]), "conv"
    if PERCEPTRON_PATCH not in vit:
        raise PeerWeightsError(
            f"{path}: found neither '{CONV_PATCH}' (conv) nor '{PERCEPTRON_PATCH}' (perceptron) patch "
            "embedding weights; the file is truncated or not a MONAI ViT."
        )
    linear = vit[PERCEPTRON_PATCH]  # [C, pd*ph*pw*C_in], flattened (p1 p2 p3 c) by MONAI's Rearrange
    voxels = linear.shape[1] // in_chans
    if patch_size is None:
        side = _cube_root(voxels)
        if side is None:
            raise PeerWeightsError(
                f"{path}: the perceptron patch embedding takes {linear.shape[1]} values per patch, which "
                "is not a cube patch; pass patch_size=(pd, ph, pw) to load_peer_encoder."
            )
        patch_size = (side, side, side)
    patch = _triple(patch_size)
    if math.prod(patch) * in_chans != linear.shape[1]:
        raise PeerWeightsError(
            f"{path}: patch_size {patch} with {in_chans} channel(s) gives {math.prod(patch) * in_chans} "
            f"values per patch, but the perceptron embedding takes {linear.shape[1]}."
        )
    weight = linear.reshape(embed_dim, *patch, in_chans).permute(0, 4, 1, 2, 3).contiguous()
    return weight, patch, "perceptron"


def _grid(n_patches: int, image_size: Any, patch: tuple[int, int, int], path: Path) -> tuple[int, int, int]:
    if image_size is not None:
        size = _triple(image_size)
        grid = tuple(s // p for s, p in zip(size, patch, strict=True))
        if math.prod(grid) != n_patches or any(s % p for s, p in zip(size, patch, strict=True)):
            raise PeerWeightsError(
                f"{path}: image_size {size} with patch {patch} gives a {grid} grid, but the position "
                f"embedding has {n_patches} patches."
            )
        return grid
    side = _cube_root(n_patches)
    if side is None:
        raise PeerWeightsError(
            f"{path}: the position embedding has {n_patches} patches, not a cube grid; pass the "
            "image_size=(D, H, W) the network was trained with to load_peer_encoder."
        )
    return (side, side, side)


def convert_vit(
    state: Mapping[str, torch.Tensor],
    path: Path,
    *,
    format: str,
    num_heads: int | None = None,
    image_size: Any = None,
    patch_size: Any = None,
) -> PeerConversion:
    """Rewrite the MONAI ViT found in `state` (at any prefix) as a ViT3D conversion."""
    prefix = find_prefix(state, ANCHOR, path, "MONAI ViT")
    vit, outside = split_prefix(state, prefix)
    pos = vit[ANCHOR]  # [1, N, C]
    embed_dim, n_patches = pos.shape[2], pos.shape[1]
    in_chans = vit[CONV_PATCH].shape[1] if CONV_PATCH in vit else 1
    patch_weight, patch, proj_type = _patch_weight(vit, embed_dim, in_chans, patch_size, path)
    grid = _grid(n_patches, image_size, patch, path)
    block_ids = {int(m.group(1)) for key in vit if (m := _BLOCK.match(key))}
    if not block_ids:
        raise PeerWeightsError(f"{path}: the MONAI ViT under prefix '{prefix}' has no blocks.N.* keys.")
    depth = max(block_ids) + 1
    fc1 = "blocks.0.mlp.linear1.weight"
    mlp_dim = vit[fc1].shape[0] if fc1 in vit else 4 * embed_dim
    if num_heads is None:
        if embed_dim % 64:
            raise PeerWeightsError(
                f"{path}: MONAI files do not store the number of heads and {embed_dim} channels are not "
                "a multiple of 64; pass num_heads= to load_peer_encoder."
            )
        num_heads = embed_dim // 64
        logger.warning(
            "%s: MONAI weights do not record num_heads; assuming embed_dim / 64 = %d (pass num_heads= if "
            "the network was trained otherwise: a wrong value gives wrong outputs, not an error).",
            path,
            num_heads,
        )
        heads_origin = "assumed embed_dim / 64"
    else:
        heads_origin = "given"

    weights = {"patch_embed.proj.weight": patch_weight}
    unmapped, ignored = [], list(outside)
    for key, tensor in vit.items():
        if key in (CONV_PATCH, PERCEPTRON_PATCH):
            continue
        if _SET_ASIDE.match(key):
            ignored.append(prefix + key)
            continue
        for pattern, replacement in _RENAMES:
            if pattern.match(key):
                weights[pattern.sub(replacement, key)] = tensor
                break
        else:
            unmapped.append(prefix + key)

    config = {
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_dim / embed_dim,
        "patch_size": patch,
        # In the axes the network was fed, like the patch size (see the module docstring).
        "image_size": tuple(g * p for g, p in zip(grid, patch, strict=True)),
        "qkv_bias": "blocks.0.attn.qkv.bias" in vit,
        # The stored table is used as is, whatever MONAI built it from (learnable, sincos, none).
        "pos_embed": "learnable",
        "cls_token": "cls_token" in vit,
        "norm_eps": MONAI_NORM_EPS,
    }
    source = {
        "prefix": prefix,
        "monai_proj_type": proj_type,
        "num_heads": heads_origin,
    }
    return PeerConversion(
        format=format,
        encoder_name=_NAMES.get((embed_dim, depth), "vit3d_base"),
        config=config,
        weights=weights,
        unmapped=unmapped,
        ignored=ignored,
        source=source,
    )


@register_peer_format(
    FORMAT,
    detect=detect,
    priority=10,
    looks_for=f"a key ending in '{ANCHOR}' (MONAI ViT/UNETR)",
    hints=("num_heads", "image_size", "patch_size"),
)
def convert(state: Mapping[str, torch.Tensor], path: Path, **hints: Any) -> PeerConversion:
    """MONAI ViT or UNETR weights (`vit.` prefix or bare) -> vit3d; hints in the format's `hints`."""
    conversion = convert_vit(state, path, format=FORMAT, **hints)
    conversion.config.update(PREPROCESSING.config_fields())
    conversion.source.update(PREPROCESSING.source_fields())
    logger.warning(
        "%s: MONAI weights do not record the spacing, HU window or intensity range they were trained "
        "with; the encoder's input spec keeps fm3d's defaults for them (config.source['spec_assumed']).",
        path,
    )
    return conversion
