"""Merlin's image encoder -> `resnet3d_i3d`.

Merlin (github.com/StanfordMIMI/Merlin) keeps its I3D ResNet-152 at `encode_image.i3_resnet.*`
in the CLIP checkpoint (beside the text tower `encode_text.*` and `logit_scale`), bare in the
five-year-prediction checkpoint, and as `encode_image.vision_model.features.{0..7}.*` (an
nn.Sequential of conv1, bn1, relu, maxpool, layer1..layer4) in the report-generation one. The
phenotype classifier (`classifier`, 1692 outputs) and the CLIP projection (`contrastive_head`,
512) are heads, set aside.

Two exact rewrites make the encoder take fm3d's input as it is:
  - channels: Merlin feeds `cat(x, x, x)` to a 3-channel stem, which equals a 1-channel stem
    whose kernel is the sum over the three input channels;
  - axes: Merlin permutes MONAI's (x, y, z) array to (z, x, y) before the network; fm3d's
    (D, H, W) is (z, y, x). Every in-plane kernel and stride is square, so transposing the
    last two kernel axes makes the network compute Merlin's feature maps transposed in-plane,
    and the pooled 2048-d embedding (a global mean) exactly Merlin's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fm3d.models.adapters.formats import register_peer_format
from fm3d.models.adapters.matching import PeerConversion, PeerWeightsError, find_prefix, split_prefix
from fm3d.models.adapters.specs import peer_preprocessing

FORMAT = "merlin"
PREPROCESSING = peer_preprocessing(FORMAT)
ANCHOR = "layer1.0.conv1.weight"
FEATURES_ANCHOR = "vision_model.features.0.weight"
# Index of each module in the report-generation model's `features` Sequential.
_FEATURES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_ENCODER = re.compile(r"^(conv1|bn1|layer[1-4])\.")
_HEADS = re.compile(r"^(classifier|contrastive_head|fc)\.")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")


def detect(state: Mapping[str, torch.Tensor]) -> str | None:
    """The report-generation layout, or an I3D stem conv1 (.., 3, 7, 7) beside layer1; None otherwise."""
    for key in state:
        if key.endswith(FEATURES_ANCHOR):
            return f"key '{key}'"
    for key in state:
        if key.endswith(ANCHOR):
            stem = state.get(key[: -len(ANCHOR)] + "conv1.weight")
            if stem is not None and stem.ndim == 5 and tuple(stem.shape[-3:]) == (3, 7, 7):
                return f"an I3D stem {tuple(stem.shape)} beside '{key}'"
    return None


def _encoder_keys(
    state: Mapping[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The i3_resnet keys without prefix, the keys outside it, and the prefix found."""
    if any(key.endswith(FEATURES_ANCHOR) for key in state):
        prefix = find_prefix(state, FEATURES_ANCHOR, path, "Merlin") + "vision_model.features."
        inside, outside = split_prefix(state, prefix)
        renamed = {}
        for key, value in inside.items():
            index, _, rest = key.partition(".")
            renamed[f"{_FEATURES.get(index, 'features.' + index)}.{rest}"] = value
        return renamed, outside, prefix
    prefix = find_prefix(state, ANCHOR, path, "Merlin I3D ResNet")
    inside, outside = split_prefix(state, prefix)
    return inside, outside, prefix


# Above every other format: another network holding an I3D stem beside layer1 is unknown to fm3d.
@register_peer_format(
    FORMAT,
    detect=detect,
    priority=40,
    looks_for=f"a key ending in '{FEATURES_ANCHOR}', or '{ANCHOR}' beside a (.., 3, 7, 7) stem (Merlin)",
)
def convert(state: Mapping[str, torch.Tensor], path: Path) -> PeerConversion:
    """Merlin CLIP / five-year / report-generation checkpoints -> resnet3d_i3d taking fm3d input."""
    inside, outside, prefix = _encoder_keys(state, path)
    if "conv1.weight" not in inside:
        raise PeerWeightsError(f"{path}: the Merlin encoder under '{prefix}' has no conv1.weight (the stem).")
    weights, unmapped, ignored = {}, [], list(outside)
    for key, tensor in inside.items():
        if _HEADS.match(key):
            ignored.append(prefix + key)
        elif not _ENCODER.match(key):
            unmapped.append(prefix + key)
        elif key.endswith("weight") and tensor.ndim == 5:
            # Merlin's (z, x, y) kernels -> fm3d's (z, y, x); the stem also folds 3 channels into 1.
            kernel = tensor.transpose(-1, -2)
            weights[key] = kernel.sum(dim=1, keepdim=True) if key == "conv1.weight" else kernel.contiguous()
        else:
            weights[key] = tensor
    blocks: dict[int, int] = {}
    for key in weights:
        if match := _BLOCK.match(key):
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if sorted(blocks) != [1, 2, 3, 4]:
        raise PeerWeightsError(
            f"{path}: expected residual stages layer1..layer4 under '{prefix}', found "
            f"{[f'layer{s}' for s in sorted(blocks)]}; the file is truncated or not Merlin's."
        )
    stem = inside["conv1.weight"]  # [64, 3, 3, 7, 7] in Merlin
    config = {
        "in_chans": 1,
        "layers": tuple(blocks[s] for s in range(1, 5)),
        "base_width": stem.shape[0],
        # Merlin's input spec in fm3d's axes (its kernels are transposed above), with its sources.
        **PREPROCESSING.config_fields(),
    }
    source = {
        **PREPROCESSING.source_fields(),
        "prefix": prefix,
        "kernels": "Merlin's (z, x, y) kernels transposed in-plane to fm3d's (z, y, x)",
        "input_channels": f"Merlin's {stem.shape[1]} replicated input channels folded into 1",
        "pooled": "Merlin's 2048-d image embedding (ImageEmbedding=True)",
    }
    return PeerConversion(
        format=FORMAT,
        encoder_name="resnet3d_i3d",
        config=config,
        weights=weights,
        unmapped=unmapped,
        ignored=ignored,
        source=source,
    )
