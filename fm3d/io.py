"""Save and load encoders: a folder of `config.json` + `model.safetensors`, Lightning `.ckpt`, peers' weights.

Nothing is unpickled by default: checkpoints are read with `torch.load(weights_only=True)`
and anything that needs arbitrary objects is refused (`UnsafeCheckpointError`) unless the
caller opts in with `trust_pickle=True`. Peers' published weights (MONAI ViT/UNETR,
VoCo/SwinUNETR, M3D-CLIP, Merlin) are handed to `fm3d.models.adapters.load_peer_encoder`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm3d.atomic import write_text_atomic
from fm3d.errors import PathError
from fm3d.models.adapters import load_peer_encoder
from fm3d.models.config import EncoderConfigError, upgrade_stored_config
from fm3d.models.registry import encoder_from_config
from fm3d.models.weights import (
    EncoderLoadError,
    check_finite,
    listed,
    read_safetensors,
    save_safetensors,
    unreadable_weights,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CKPT_CONFIG_KEY = "fm3d_encoder_config"
CKPT_PREFIX = "encoder."
# Written by fine-tuning runs whose encoder carries adapters (LoRA): the encoder's weights with
# the adapters merged, under its own parameter names, so loading needs no peft.
CKPT_MERGED_KEY = "fm3d_encoder_state_dict"


class UnsafeCheckpointError(EncoderLoadError):
    """A checkpoint that holds arbitrary pickled objects, refused unless `trust_pickle=True`."""


class CheckpointReadError(PathError):
    """A training checkpoint torch cannot read back (truncated, corrupt, or not a checkpoint)."""


# What torch.load raises on a file cut short or not written by torch.save.
TORCH_READ_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def unreadable_checkpoint(path: str | Path, error: Exception) -> CheckpointReadError:
    """The one-line error for a `--ckpt_path` torch could not read: the file, torch's reason, the way out."""
    # torch's first sentence says what failed; the rest is advice this message replaces.
    text = str(error).strip()
    reason = (text.splitlines()[0].split(". ")[0] if text else "") or type(error).__name__
    return CheckpointReadError(
        path,
        f"cannot be read as a checkpoint ({reason})",
        "the file is truncated or corrupt (a copy or save cut short?): resume from an intact "
        "checkpoint, or start afresh without --ckpt_path",
    )


def save_encoder(encoder: nn.Module, directory: str | Path) -> Path:
    """Write `encoder` to `directory` as config.json (family, sizes, preprocessing) + model.safetensors.

    Both files are written atomically, weights first: a save killed in between leaves new
    weights beside the old config, which loading refuses by shape instead of mixing silently.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = encoder.config.to_dict()
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    save_safetensors(state, directory / WEIGHTS_FILE, metadata={"format": "pt", "fm3d_name": config["name"]})
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("saved encoder %s to %s", config["name"], directory)
    return directory


def _load_strict(encoder: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` only when its names and shapes are exactly the encoder's, and its values finite."""
    expected = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    not_tensors = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise EncoderLoadError(
            f"{source}: entries [{listed(not_tensors)}] are not tensors; the file is not a saved state dict."
        )
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    wrong = [
        f"{name}: file {tuple(state[name].shape)} vs config {shape}"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    if missing or unexpected or wrong:
        raise EncoderLoadError(
            f"{source}: weights do not match the {encoder.config.name} config. "
            f"Missing: [{listed(missing)}]; unexpected: [{listed(unexpected)}]; "
            f"wrong shapes: [{listed(wrong)}]. The config and the weights come from different models; "
            "export the encoder again (or fix its config.json)."
        )
    check_finite(state, source)
    encoder.load_state_dict(state, strict=True)


def _build(config: dict[str, Any], source: Path) -> nn.Module:
    """The encoder a stored config describes (renamed keys mapped); a config error names the file."""
    try:
        return encoder_from_config(upgrade_stored_config(config))
    except EncoderConfigError as error:
        raise EncoderLoadError(f"{source}: {error}") from error


def _torch_load(path: Path, trust_pickle: bool, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as error:  # torch's reader on a truncated or corrupt file
        raise unreadable_weights(path, error) from error
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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EncoderLoadError(f"{file} is not valid JSON ({error}); re-export the encoder.") from error
    # A Hugging Face model folder (M3D-CLIP) also has a config.json, with "model_type" instead.
    return config if isinstance(config, dict) and "family" in config else None


def _load_native(directory: Path, config: dict[str, Any], map_location: str | torch.device) -> nn.Module:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise EncoderLoadError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}; re-export the encoder.")
    encoder = _build(config, directory / CONFIG_FILE)
    _load_strict(encoder, read_safetensors(weights, map_location), weights)
    return encoder


def _load_lightning(checkpoint: dict[str, Any], path: Path) -> nn.Module:
    if CKPT_CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise EncoderLoadError(
            f"{path} is not an fm3d Lightning checkpoint (no '{CKPT_CONFIG_KEY}' / 'state_dict'); "
            "pass format=... for a peer's weights."
        )
    if not isinstance(checkpoint[CKPT_CONFIG_KEY], dict):
        raise EncoderLoadError(
            f"{path}: '{CKPT_CONFIG_KEY}' is not a config dict; save the checkpoint again."
        )
    encoder = _build(checkpoint[CKPT_CONFIG_KEY], path)
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


def load_encoder(
    path: str | Path,
    *,
    format: str = "auto",
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load an encoder from an fm3d folder, an fm3d Lightning `.ckpt`, or a peer's published weights.

    format: "auto" (detect), "fm3d" (export folder), "lightning" (fm3d `.ckpt`), or a registered
    peer format (`fm3d.models.adapters.peer_formats()`: "monai_vit", "m3d_clip", "voco", "merlin").
    The encoder's `config.input_spec` says what its input must look like;
    `fm3d.preprocessing(encoder)` turns a volume into it.
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
        return load_peer_encoder(path, format=format, state_dict=None)
    if format == "fm3d":
        raise EncoderLoadError(f"{path} is a file; format='fm3d' expects an export folder.")
    if path.suffix == ".safetensors":
        content: Any = read_safetensors(path, map_location)
    else:
        content = _torch_load(path, trust_pickle, map_location)
    is_fm3d_ckpt = isinstance(content, dict) and CKPT_CONFIG_KEY in content
    if format == "lightning" or (format == "auto" and is_fm3d_ckpt):
        return _load_lightning(content, path)
    return load_peer_encoder(path, format=format, state_dict=content)
