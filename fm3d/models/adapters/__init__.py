"""Peers' published weights as fm3d encoders: MONAI ViT/UNETR, M3D-CLIP, VoCo/SwinUNETR, Merlin.

`fm3d.load_encoder(path)` reads the file safely (weights only) and hands anything that is not
an fm3d export here; `load_peer_encoder` recognises the layout from the keys (or takes
`format=`), rewrites the keys onto an fm3d family, and loads only when the whole encoder
matches (see `matching`). The loaded encoder's `config.source` records the format and the
input the weights expect (axes, intensity, spacing, size); `encoder.peer_weights_report` holds
the key counts. docs/peer-weights.md has the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm3d.io import read_safetensors
from fm3d.models.adapters import m3d_clip, merlin, monai_vit, voco_swin
from fm3d.models.adapters.matching import (
    KeyMatchReport,
    PeerConversion,
    PeerWeightsError,
    check_conversion,
    shown,
    unwrap_state_dict,
)
from fm3d.models.adapters.matching import load_conversion as _load_conversion

__all__ = [
    "PEER_FORMATS",
    "KeyMatchReport",
    "PeerConversion",
    "PeerWeightsError",
    "check_conversion",
    "convert_peer_weights",
    "detect_format",
    "load_peer_encoder",
]

Converter = Callable[..., PeerConversion]
PEER_FORMATS: dict[str, Converter] = {
    monai_vit.FORMAT: monai_vit.convert,
    m3d_clip.FORMAT: m3d_clip.convert,
    voco_swin.FORMAT: voco_swin.convert,
    merlin.FORMAT: merlin.convert,
}


def detect_format(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> str:
    """The peer format whose anchor keys `state` holds (checked Merlin, VoCo, M3D, MONAI ViT)."""
    if merlin.looks_like_merlin(state):
        return merlin.FORMAT
    if any(key.endswith(name + voco_swin.ANCHOR) for key in state for name in voco_swin.SWIN_NAMES):
        return voco_swin.FORMAT
    if any(key.endswith(monai_vit.ANCHOR) for key in state):
        return m3d_clip.FORMAT if m3d_clip.looks_like_m3d(state) else monai_vit.FORMAT
    raise PeerWeightsError(
        f"{path}: not an fm3d encoder, and no peer layout recognised: looked for keys ending in "
        f"'{merlin.ANCHOR}' (Merlin), 'swinViT.{voco_swin.ANCHOR}' (VoCo/SwinUNETR) and "
        f"'{monai_vit.ANCHOR}' (MONAI ViT/UNETR, M3D-CLIP). First keys: {shown(state)}. "
        f"fm3d reads {sorted(PEER_FORMATS)} under the peers' own module names; rename renamed keys back."
    )


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
    fmt = detect_format(state, path) if format == "auto" else format
    if fmt not in PEER_FORMATS:
        raise PeerWeightsError(f"{path}: unknown format {format!r}; peer formats: {sorted(PEER_FORMATS)}.")
    if hints and fmt != monai_vit.FORMAT:
        raise PeerWeightsError(
            f"{path}: hints {sorted(hints)} only apply to format='monai_vit'; the {fmt} layout fixes them."
        )
    return PEER_FORMATS[fmt](state, Path(path), **hints)


def load_peer_encoder(
    path: str | Path, *, format: str = "auto", state_dict: Any = None, **hints: Any
) -> nn.Module:
    """Load a peer's weights as an fm3d encoder; refuses unless every encoder tensor is matched.

    path: the file or folder the weights came from (named in every message; a folder is read
        as its *.safetensors when `state_dict` is None).
    format: "auto" (detect from the keys) or one of `PEER_FORMATS`.
    state_dict: the loaded checkpoint (a state dict, or a dict wrapping one under "state_dict",
        "network_weights", "net" or "model"); `fm3d.load_encoder` reads files weights-only and
        passes it here.
    hints: for "monai_vit" only, what MONAI files do not store: num_heads (default
        embed_dim / 64), img_size (when the patch grid is not a cube), patch_size (for a
        perceptron embedding whose patch is not a cube).
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
