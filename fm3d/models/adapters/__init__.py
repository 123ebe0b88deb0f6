"""Peers' published weights as fm3d encoders: MONAI ViT/UNETR, M3D-CLIP, VoCo/SwinUNETR, Merlin.

`fm3d.load_encoder(path)` reads the file safely (weights only) and hands anything that is not
an fm3d export here; `load_peer_encoder` recognises the layout from the keys (or takes
`format=`), rewrites the keys onto an fm3d family, and loads only when the whole encoder
matches (see `matching`). Each peer module registers its format (`formats`), so a new one is a
new file in this package. The loaded encoder's config holds the peer's input spec (spacing, HU
window, intensity range, axis order, size; `specs.PEERS` holds each peer's, with its sources) and
`config.source` where the weights came from;
`encoder.peer_weights_report` holds the key counts. docs/peer-weights.md has the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm3d.models.adapters.formats import (
    PeerFormat,
    detect_format,
    peer_format,
    peer_formats,
    register_peer_format,
)
from fm3d.models.adapters.matching import (
    KeyMatchReport,
    PeerConversion,
    PeerWeightsError,
    check_conversion,
    unwrap_state_dict,
)
from fm3d.models.adapters.matching import load_conversion as _load_conversion
from fm3d.models.weights import read_safetensors

__all__ = [
    "KeyMatchReport",
    "PeerConversion",
    "PeerFormat",
    "PeerWeightsError",
    "check_conversion",
    "convert_peer_weights",
    "detect_format",
    "load_peer_encoder",
    "peer_formats",
    "register_peer_format",
]


def _read_folder(path: Path) -> dict[str, torch.Tensor]:
    """The merged *.safetensors of a model folder (a Hugging Face folder may shard them)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PeerWeightsError(
            f"{path} is a folder without fm3d's config.json and without *.safetensors files. Pass the "
            "weights file itself (e.g. pretrained_ViT.bin, a .pt) to fm3d.load_encoder."
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file))
    return state


def convert_peer_weights(
    state_dict: Any, path: str | Path = "<state dict>", *, format: str = "auto", **hints: Any
) -> PeerConversion:
    """Rewrite a loaded peer checkpoint (possibly wrapped) for an fm3d encoder, without building it."""
    state = unwrap_state_dict(state_dict, path)
    fmt = peer_format(detect_format(state, path) if format == "auto" else format, path)
    refused = sorted(set(hints) - set(fmt.hints))
    if refused:
        takers = sorted(name for name, other in peer_formats().items() if set(hints) <= set(other.hints))
        raise PeerWeightsError(
            f"{path}: hints {refused} do not apply to format {fmt.name!r}, whose layout fixes them"
            + (f"; they apply to format={' or '.join(map(repr, takers))}." if takers else ".")
        )
    return fmt.convert(state, Path(path), **hints)


def load_peer_encoder(
    path: str | Path, *, format: str = "auto", state_dict: Any = None, **hints: Any
) -> nn.Module:
    """Load a peer's weights as an fm3d encoder; refuses unless every encoder tensor is matched.

    path: the file or folder the weights came from (named in every message; a folder is read
        as its *.safetensors when `state_dict` is None).
    format: "auto" (detect from the keys) or a registered format (`peer_formats()`).
    state_dict: the loaded checkpoint (a state dict, or a dict wrapping one under "state_dict",
        "network_weights", "net" or "model"); `fm3d.load_encoder` reads files weights-only and
        passes it here.
    hints: what a format's files do not store, where the format takes them (`PeerFormat.hints`);
        "monai_vit" takes num_heads (default embed_dim / 64), image_size (when the patch grid is
        not a cube) and patch_size (for a perceptron embedding whose patch is not a cube).
    """
    path = Path(path)
    if state_dict is None:
        if path.is_dir():
            state_dict = _read_folder(path)
        elif path.suffix == ".safetensors":
            state_dict = read_safetensors(path)
        else:
            raise PeerWeightsError(
                f"{path}: pass the loaded checkpoint as state_dict= (torch.load(path, weights_only=True)), "
                "or call fm3d.load_encoder(path), which reads it safely."
            )
    return _load_conversion(convert_peer_weights(state_dict, path, format=format, **hints), path)
