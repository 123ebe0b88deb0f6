"""VoCo / SwinUNETR(-v2) weights -> `swin3d_*`.

VoCo (Wu et al., CVPR 2024, github.com/Luffy03/VoCo; v2 in Luffy03/Large-Scale-Medical)
pretrains the encoder of MONAI's SwinUNETR-v2: `swinViT.*` (patch embedding, four Swin
stages `layers{1..4}`, v2's residual conv blocks `layers{1..4}c`) and the conv blocks
`encoder{1,2,3,4,10}`. fm3d's swin3d family keeps those module names, so keys map one to one.
Checkpoints arrive wrapped (`state_dict`, `network_weights`, `net`) and prefixed (`module.`
from DDP, `backbone.` from VoCo-v2's VoCoHead, `swin_vit.` in old MONAI self-supervised
files); decoders and projection heads beside the encoder are set aside.

Everything the swin3d config needs is in the shapes: feature_size and patch from the patch
embedding, depths from the block indices, heads from the relative position bias tables, the
window from the table length ((2w - 1)^3 rows), mlp_ratio, qkv_bias and v2 from the keys.
VoCo's inputs are MONAI (x, y, z) arrays of the RAS volume (`LoadImage`, `Orientation("RAS")`)
at 1.5 mm (`Spacingd`), HU [-175, 250] -> [0, 1] (`ScaleIntensityRanged`), fine-tuned on
96 x 96 x 96 crops; fm3d does not transpose weights, so the input spec says axis_order "xyz"
and `fm3d.preprocessing(encoder)` feeds the encoder exactly that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fm3d.models.adapters.formats import register_peer_format
from fm3d.models.adapters.matching import PeerConversion, PeerWeightsError, find_prefix, split_prefix
from fm3d.models.adapters.specs import peer_preprocessing

FORMAT = "voco"
PREPROCESSING = peer_preprocessing(FORMAT)
ANCHOR = "patch_embed.proj.weight"
# The names old MONAI self-supervised checkpoints use for MONAI's current `swinViT`.
SWIN_NAMES = ("swinViT.", "swin_vit.")
ENCODER_MODULES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
_BLOCK = re.compile(r"^swinViT\.layers(\d)\.0\.blocks\.(\d+)\.")
_NAMES = {12: "swin3d_tiny", 48: "swin3d_base", 96: "swin3d_large", 192: "swin3d_huge"}


def detect(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of a SwinUNETR patch embedding (`swinViT.` or `swin_vit.`, any prefix), or None."""
    return next((f"key '{key}'" for key in state for name in SWIN_NAMES if key.endswith(name + ANCHOR)), None)


def _window(table_rows: int, path: Path) -> int:
    side = round(table_rows ** (1 / 3))
    if side**3 != table_rows or side % 2 == 0:
        raise PeerWeightsError(f"{path}: a relative position table of {table_rows} rows is not (2w - 1)^3.")
    return (side + 1) // 2


def _find_swin_prefix(state: Mapping[str, torch.Tensor], path: Path) -> tuple[str, str]:
    """The prefix in front of the Swin module and the Swin module's own name."""
    found = [
        (key[: -len(name + ANCHOR)], name)
        for key in state
        for name in SWIN_NAMES
        if key.endswith(name + ANCHOR) and (key == name + ANCHOR or key.endswith("." + name + ANCHOR))
    ]
    if not found:
        find_prefix(state, "swinViT." + ANCHOR, path, "VoCo/SwinUNETR")  # raises, naming the keys
    if len(found) > 1:
        prefixes = sorted(prefix + name for prefix, name in found)
        raise PeerWeightsError(
            f"{path}: holds several Swin encoders, under {prefixes}. Keep the one you want "
            "(VoCo's EMA teacher is usually the better one) and save it on its own."
        )
    return found[0]


@register_peer_format(
    FORMAT,
    detect=detect,
    priority=30,
    looks_for=f"a key ending in 'swinViT.{ANCHOR}' or 'swin_vit.{ANCHOR}' (VoCo/SwinUNETR)",
)
def convert(state: Mapping[str, torch.Tensor], path: Path) -> PeerConversion:
    """SwinUNETR-shaped weights (any wrapper prefix) -> swin3d with sizes read from the shapes."""
    prefix, swin_name = _find_swin_prefix(state, path)
    inside, outside = split_prefix(state, prefix)
    # Old self-supervised files call the Swin module `swin_vit`; MONAI and fm3d call it `swinViT`.
    inside = {
        ("swinViT." + key[len(swin_name) :] if key.startswith(swin_name) else key): value
        for key, value in inside.items()
    }
    weights = {key: value for key, value in inside.items() if key.startswith(ENCODER_MODULES)}
    ignored = outside + [prefix + key for key in inside if key not in weights]

    patch = weights["swinViT.patch_embed.proj.weight"]  # [F, C_in, p, p, p]
    feature_size = patch.shape[0]
    depths: dict[int, int] = {}
    for key in weights:
        if match := _BLOCK.match(key):
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if sorted(depths) != [1, 2, 3, 4]:
        raise PeerWeightsError(
            f"{path}: expected Swin stages layers1..layers4 under '{prefix}{swin_name}', found "
            f"{[f'layers{s}' for s in sorted(depths)]}; the file is truncated or not a SwinUNETR."
        )
    table_key = "swinViT.layers{}.0.blocks.0.attn.relative_position_bias_table"
    tables = [weights.get(table_key.format(stage)) for stage in (1, 2, 3, 4)]
    if any(table is None for table in tables):
        raise PeerWeightsError(
            f"{path}: a Swin stage has no relative_position_bias_table; the file is truncated."
        )
    fc1 = weights.get("swinViT.layers1.0.blocks.0.mlp.linear1.weight")
    config = {
        "in_chans": patch.shape[1],
        "patch_size": patch.shape[2],
        "feature_size": feature_size,
        "depths": tuple(depths[s] for s in range(1, 5)),
        "num_heads": tuple(table.shape[1] for table in tables),
        "window_size": _window(tables[0].shape[0], path),
        "mlp_ratio": (fc1.shape[0] / feature_size) if fc1 is not None else 4.0,
        "qkv_bias": "swinViT.layers1.0.blocks.0.attn.qkv.bias" in weights,
        "use_v2": any(key.startswith("swinViT.layers1c.") for key in weights),
        # VoCo's input spec (MONAI's (x, y, z) axes, its 96^3 fine-tuning crop; any multiple of
        # 32 per axis runs), with its sources.
        **PREPROCESSING.config_fields(),
    }
    source = {**PREPROCESSING.source_fields(), "prefix": prefix}
    return PeerConversion(
        format=FORMAT,
        encoder_name=_NAMES.get(feature_size, "swin3d_base"),
        config=config,
        weights=weights,
        unmapped=[],
        ignored=ignored,
        source=source,
    )
