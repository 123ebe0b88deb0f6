"""The encoders a suite compares: loaded weights, or an architecture with random initialisation.

An encoder is named on the command line as `[label=]source`, where source is
- anything `fm3d.load_encoder` takes: an export folder, an fm3d Lightning `.ckpt`, a peer's
  weight file or folder;
- a registry name (`vit3d_tiny`): that architecture, randomly initialised;
- `random:<path or registry name>`: the architecture (and input spec) of that encoder with
  fresh random weights, the baseline a pretrained encoder must beat.
The label is the table's column (default: the source as given). Random weights come from the
suite's seed, so a rerun draws the same ones.

Each entry carries an identity: a hash of the weights' files (or of the config and seed for
random weights) that keys the feature cache, and the text side (`<run>/export/clip` next to an
exported encoder) that zero-shot and retrieval need.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fm3d.data.atomic import content_hash, files_of
from fm3d.errors import Fm3dError
from fm3d.io import load_encoder
from fm3d.models.registry import create_encoder, encoder_from_config, list_encoders
from fm3d.spec import InputSpec

RANDOM_PREFIX = "random:"
# The folder pretraining exports the CLIP heads to, beside `export/encoder`.
CLIP_FOLDER = "clip"


class EncoderSourceError(Fm3dError, ValueError):
    """An encoder named on the command line that is neither a loadable path nor a registry name."""


@dataclass
class EncoderEntry:
    """One encoder of the suite.

    label: its column in the table. source: what was given. module: the frozen encoder.
    identity: hash of its weights (files, or config + seed when random). random_init: whether
    its weights are fresh. clip: the CLIP heads folder of its text side, or None.
    """

    label: str
    source: str
    module: nn.Module
    identity: str
    random_init: bool
    clip: Path | None

    @property
    def spec(self) -> InputSpec:
        """The input spec the encoder's weights expect (`encoder.config.input_spec`)."""
        return self.module.config.input_spec


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, or of every file under a folder (`fm3d.data.atomic.content_hash`)."""
    return content_hash(files_of(path))


def _random_from(source: str, seed: int) -> nn.Module:
    """The architecture of `source` (registry name or loadable path) with weights drawn from `seed`."""
    config = None if source in list_encoders() else load_encoder(source).config.to_dict()
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        return create_encoder(source) if config is None else encoder_from_config(config)


def _text_side(path: Path) -> Path | None:
    clip = path.parent / CLIP_FOLDER
    return clip if path.is_dir() and (clip / "config.json").is_file() else None


def load_entry(named: str, seed: int) -> EncoderEntry:
    """The encoder named `[label=]source` (see the module docstring), frozen and in eval mode."""
    # A path that exists is a source even when it holds "=" (no label then).
    label, _, source = ("", "", named) if Path(named).exists() else named.rpartition("=")
    label = label or source
    random_source = source.removeprefix(RANDOM_PREFIX) if source.startswith(RANDOM_PREFIX) else None
    if random_source is None and source in list_encoders():
        random_source = source
    if random_source is not None:
        if random_source not in list_encoders() and not Path(random_source).exists():
            raise EncoderSourceError(
                f"{named!r}: {random_source!r} is neither a registry encoder ({', '.join(list_encoders())}) "
                "nor an existing path"
            )
        module = _random_from(random_source, seed)
        config = json.dumps(module.config.to_dict(), sort_keys=True, default=str)
        identity = hashlib.blake2b(f"random\0{seed}\0{config}".encode(), digest_size=16).hexdigest()
        clip = None
    else:
        path = Path(source)
        if not path.exists():
            raise EncoderSourceError(
                f"{named!r}: {source} does not exist and is not a registry encoder; give an export "
                f"folder, a .ckpt, a peer's weights, a registry name ({', '.join(list_encoders())}) or "
                f"{RANDOM_PREFIX}<one of those>"
            )
        module = load_encoder(path)
        clip = _text_side(path)
        # The text side is part of what zero-shot and retrieval score, so new CLIP heads beside
        # the same encoder must not reuse the old figures.
        identity = file_digest(path) + (f"+{file_digest(clip)}" if clip else "")
    module.requires_grad_(False).eval()
    return EncoderEntry(label, source, module, identity, random_source is not None, clip)


def load_entries(named: list[str], seed: int) -> list[EncoderEntry]:
    """Every encoder of the suite, in the order given (the first is what the others are compared with)."""
    entries = [load_entry(n, seed) for n in named]
    labels = [e.label for e in entries]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise EncoderSourceError(
            f"two encoders share the label(s) {duplicates}; name them apart as label=source"
        )
    return entries
