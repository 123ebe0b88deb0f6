"""M3D-CLIP's vision tower -> `vit3d_base` with M3D's geometry.

M3D (Bai et al., 2024, github.com/BAAI-DCAI/M3D) builds its image encoder as a MONAI 1.3 ViT
(`LaMed/src/model/multimodal_encoder/vit.py`): input 1 x 32 x 256 x 256, patch (4, 16, 16),
a "perceptron" patch embedding (Rearrange + Linear), 768 channels, 12 blocks, 12 heads, no qkv
bias, a cls token and a learnable position embedding over the 8 x 16 x 16 patches
(`M3DCLIPConfig` in `LaMed/src/model/CLIP.py`). It is found in three files:
  - M3D-CLIP (Hugging Face model folder): under `vision_encoder.`, beside `language_encoder.*`,
    `mm_vision_proj`, `mm_language_proj` and `logit_scale` (set aside: not the image encoder);
  - `pretrained_ViT.bin`, the tower alone, bare keys;
  - M3D-LaMed: under `model.vision_tower.vision_tower.`.
The mapping is MONAI's (see `monai_vit`), with the head count and grid fixed to M3D's.

M3D's volumes are 2D display images (8-bit JPEG/PNG slices of M3D-Cap) stacked as
(slice, row, column), min-max scaled per volume to [0, 1], foreground-cropped and resized to
32 x 256 x 256 (`Data/process/m3d_cap_data_prepare.py`): no spacing and no HU window. The
input spec says what it can: axis order "zyx" (slices first, as fm3d's D; M3D's display rows
and columns run opposite to RAS y and x, which a spec cannot say), image_size 32 x 256 x 256
and intensity [0, 1]; spacing and HU window keep fm3d's defaults and are listed in
`config.source["spec_assumed"]`, since a CT read from NIfTI needs some (a resize to
32 x 256 x 256 is what M3D did instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from fm3d.models.adapters.formats import register_peer_format
from fm3d.models.adapters.matching import PeerConversion, find_prefix
from fm3d.models.adapters.monai_vit import ANCHOR, PERCEPTRON_PATCH, convert_vit
from fm3d.models.adapters.specs import peer_preprocessing

FORMAT = "m3d_clip"
PREPROCESSING = peer_preprocessing(FORMAT)
IMAGE_SIZE = PREPROCESSING.spec.image_size
PATCH_SIZE = (4, 16, 16)
EMBED_DIM = 768
# Prefixes that only M3D writes in front of its MONAI ViT.
M3D_PREFIXES = ("vision_encoder.", "vision_tower.vision_tower.")


def detect(state: Mapping[str, torch.Tensor]) -> str | None:
    """An M3D prefix, or a bare MONAI ViT with exactly M3D's perceptron geometry; None otherwise."""
    for key, tensor in state.items():
        if not key.endswith(ANCHOR):
            continue
        prefix = key[: -len(ANCHOR)]
        if prefix.endswith(M3D_PREFIXES):
            return f"M3D prefix '{prefix}'"
        linear = state.get(prefix + PERCEPTRON_PATCH)
        grid = math.prod(s // p for s, p in zip(IMAGE_SIZE, PATCH_SIZE, strict=True))
        if linear is not None and tuple(linear.shape) == (EMBED_DIM, 4 * 16 * 16) and tensor.shape[1] == grid:
            return f"M3D's perceptron geometry under '{prefix}'"
    return None


# Above monai_vit: an M3D tower is a MONAI ViT whose head count and grid M3D fixes.
@register_peer_format(
    FORMAT,
    detect=detect,
    priority=20,
    looks_for=f"'{ANCHOR}' under {list(M3D_PREFIXES)} or with M3D's 4 x 16 x 16 perceptron patch (M3D-CLIP)",
)
def convert(state: Mapping[str, torch.Tensor], path: Path) -> PeerConversion:
    """M3D-CLIP / pretrained_ViT.bin / M3D-LaMed vision tower -> vit3d_base at 32 x 256 x 256."""
    # M3D fixes the geometry. Its published tower has 768 channels in 12 heads of 64; other
    # widths of M3DCLIPConfig get heads of 64 too.
    prefix = find_prefix(state, ANCHOR, path, "M3D-CLIP vision tower")
    num_heads = max(state[prefix + ANCHOR].shape[2] // 64, 1)
    conversion = convert_vit(
        state, path, format=FORMAT, num_heads=num_heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE
    )
    conversion.config.update(PREPROCESSING.config_fields())
    conversion.source.update(
        num_heads="embed_dim / 64 (M3DCLIPConfig: 768 / 12)", **PREPROCESSING.source_fields()
    )
    return conversion
