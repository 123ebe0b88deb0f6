"""Save and load encoders: a folder of `config.json` + `model.safetensors`, Lightning `.ckpt`, peers' weights.

Nothing is unpickled by default: checkpoints are read with `torch.load(weights_only=True)`
and anything that needs arbitrary objects is refused (`UnsafeCheckpointError`) unless the
caller opts in with `trust_pickle=True`. Peers' published weights (MONAI ViT/UNETR,
VoCo/SwinUNETR, M3D-CLIP, Merlin) are handed to `fm3d.models.adapters.load_peer_encoder`.
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fm3d.errors import Fm3dError
from fm3d.models.registry import encoder_from_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CKPT_CONFIG_KEY = "fm3d_encoder_config"
CKPT_PREFIX = "encoder."
# Written by fine-tuning runs whose encoder carries adapters (LoRA): the encoder's weights with
# the adapters merged, under its own parameter names, so loading needs no peft.
CKPT_MERGED_KEY = "fm3d_encoder_state_dict"


class EncoderLoadError(Fm3dError, RuntimeError):
    """An encoder file or folder that cannot be read or does not match its config."""


class UnsafeCheckpointError(EncoderLoadError):
    """A checkpoint that holds arbitrary pickled objects, refused unless `trust_pickle=True`."""


def save_encoder(encoder: nn.Module, directory: str | Path) -> Path:
    """Write `encoder` to `directory` as config.json (family, sizes, preprocessing) + model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = encoder.config.to_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt", "fm3d_name": config["name"]})
    logger.info("saved encoder %s to %s", config["name"], directory)
    return directory


def _load_strict(encoder: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EncoderLoadError(
            f"{source}: weights do not match the {encoder.config.name} config. "
            f"Missing: {result.missing_keys[:20]}{' ...' if len(result.missing_keys) > 20 else ''}; "
            f"unexpected: {result.unexpected_keys[:20]}{' ...' if len(result.unexpected_keys) > 20 else ''}."
        )


def _unreadable(path: Path, error: Exception) -> EncoderLoadError:
    return EncoderLoadError(
        f"{path} could not be read: {error}. The file is truncated or corrupt (an interrupted download "
        "or copy?), or not a PyTorch/safetensors file; download or save it again."
    )


def read_safetensors(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a truncated or corrupt file is an EncoderLoadError naming it."""
    try:
        return load_file(path, device=str(map_location))
    except SafetensorError as error:
        raise _unreadable(path, error) from error


def _torch_load(path: Path, trust_pickle: bool, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as error:  # torch's reader on a truncated or corrupt file
        raise _unreadable(path, error) from error
    except pickle.UnpicklingError as error:
        if not trust_pickle:
            found = re.search(r"GLOBAL (\S+)", str(error))
            what = f" (e.g. {found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects{what} that weights-only loading refuses. "
                "Loading it would run arbitrary code from the file; if you trust its source, call "
                "load_encoder(..., trust_pickle=True)."
            ) from error
    logger.warning("unpickling %s with weights_only=False because trust_pickle=True", path)
    return torch.load(path, map_location=map_location, weights_only=False)


def _fm3d_config(directory: Path) -> dict[str, Any] | None:
    """The folder's config.json when it is fm3d's (it has a "family"); None for none or a foreign one."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise EncoderLoadError(f"{file} is not valid JSON ({error}); re-export the encoder.") from error
    # A Hugging Face model folder (M3D-CLIP) also has a config.json, with "model_type" instead.
    return config if isinstance(config, dict) and "family" in config else None


def _load_native(directory: Path, config: dict[str, Any], map_location: str | torch.device) -> nn.Module:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise EncoderLoadError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}; re-export the encoder.")
    encoder = encoder_from_config(config)
    _load_strict(encoder, read_safetensors(weights, map_location), weights)
    return encoder


def _load_lightning(checkpoint: dict[str, Any], path: Path) -> nn.Module:
    if CKPT_CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise EncoderLoadError(
            f"{path} is not an fm3d Lightning checkpoint (no '{CKPT_CONFIG_KEY}' / 'state_dict'); "
            "pass format=... for a peer's weights."
        )
    encoder = encoder_from_config(checkpoint[CKPT_CONFIG_KEY])
    if CKPT_MERGED_KEY in checkpoint:
        _load_strict(encoder, checkpoint[CKPT_MERGED_KEY], path)
        return encoder
    state = {
        key[len(CKPT_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(CKPT_PREFIX)
    }
    if not state:
        raise EncoderLoadError(f"{path}: the checkpoint's state_dict has no '{CKPT_PREFIX}*' keys.")
    _load_strict(encoder, state, path)
    return encoder


def _load_peer(path: Path, format: str, state_dict: Any) -> nn.Module:
    try:
        adapters = importlib.import_module("fm3d.models.adapters")
    except ModuleNotFoundError as error:
        if error.name != "fm3d.models.adapters":
            raise
        raise EncoderLoadError(
            f"{path} is not an fm3d encoder (no {CONFIG_FILE}, no '{CKPT_CONFIG_KEY}'), and the peer-weight "
            "adapters (fm3d.models.adapters) are not part of this installation."
        ) from error
    load_peer_encoder = getattr(adapters, "load_peer_encoder", None)
    if load_peer_encoder is None:
        raise EncoderLoadError(
            f"{path} is not an fm3d encoder, and fm3d.models.adapters has no load_peer_encoder yet."
        )
    return load_peer_encoder(path, format=format, state_dict=state_dict)


def load_encoder(
    path: str | Path,
    *,
    format: str = "auto",
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an encoder from an fm3d folder, an fm3d Lightning `.ckpt`, or a peer's published weights.

    format: "auto" (detect), "fm3d" (export folder), "lightning" (fm3d `.ckpt`), or a peer
    format that `fm3d.models.adapters` knows ("monai_vit", "m3d_clip", "voco", "merlin").
    """
    path = Path(path)
    if not path.exists():
        raise EncoderLoadError(f"{path} does not exist.")
    if path.is_dir():
        config = _fm3d_config(path)
        if format in ("auto", "fm3d") and config is not None:
            return _load_native(path, config, map_location)
        if format == "fm3d":
            raise EncoderLoadError(
                f"{path} has no fm3d {CONFIG_FILE} (one with a 'family' key); it is not an fm3d export."
            )
        return _load_peer(path, format, None)
    if format == "fm3d":
        raise EncoderLoadError(f"{path} is a file; format='fm3d' expects an export folder.")
    if path.suffix == ".safetensors":
        content: Any = read_safetensors(path, map_location)
    else:
        content = _torch_load(path, trust_pickle, map_location)
    is_fm3d_ckpt = isinstance(content, dict) and CKPT_CONFIG_KEY in content
    if format == "lightning" or (format == "auto" and is_fm3d_ckpt):
        return _load_lightning(content, path)
    return _load_peer(path, format, content)
