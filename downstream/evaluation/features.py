"""An encoder's pooled embedding of every study, extracted once with its own input spec and cached.

Each study is read from the prepared cache as a `Volume` (HU at the cache's spacing and window)
and given to the encoder through `fm3d.preprocessing(spec)`, the same function a user calls on a
file read from disk: a study prepared at another spacing than the encoder expects is resampled
to it, clipped to the encoder's HU window, scaled to its intensity range and put in its axis
order. `input_notes` says in words where that departs from the prepared data (resampling, a
window wider than the one the cache was clipped to, a crop), for the suite's table.

Features are stored as `<features_dir>/<key>.npz`, the key a hash of the encoder's identity
(its weight files), the input spec, the cache's index and `FEATURES_VERSION`, so a rerun with
the same encoder and data reads them back, and any change to either extracts again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from downstream.evaluation.encoders import EncoderEntry, file_digest
from downstream.evaluation.studies import Features
from fm3d.atomic import atomic_path
from fm3d.data.cache import INDEX_FILE, PreparedCache
from fm3d.data.volume import Volume
from fm3d.encoder_input import preprocessing
from fm3d.spec import InputSpec
from fm3d.train.progress import progress

logger = logging.getLogger(__name__)

# Bump when extraction changes what it computes, so old cached features are not reused.
FEATURES_VERSION = 1


def features_key(entry: EncoderEntry, cache: PreparedCache) -> str:
    """The cache key of `entry`'s features of `cache`'s studies."""
    parts = {
        "version": FEATURES_VERSION,
        "encoder": entry.identity,
        "spec": entry.spec.to_dict(),
        "cache": file_digest(cache.root / INDEX_FILE),
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def input_notes(spec: InputSpec, cache: PreparedCache) -> list[str]:
    """How the encoder's input differs from the prepared studies (empty when it reads them as they are)."""
    prepared = cache.input_spec
    notes = []
    resampled = not all(
        math.isclose(a, b, rel_tol=1e-3)
        for a, b in zip(spec.target_spacing_mm, prepared.target_spacing_mm, strict=True)
    )
    if resampled:
        notes.append(
            f"resampled from {list(prepared.target_spacing_mm)} to {list(spec.target_spacing_mm)} mm"
        )
    if spec.hu_window[0] < prepared.hu_window[0] or spec.hu_window[1] > prepared.hu_window[1]:
        notes.append(
            f"HU window {list(spec.hu_window)} is wider than the cache's {list(prepared.hu_window)}: "
            "voxels beyond it read as its ends"
        )
    # After resampling the size changes anyway; without it, only studies of another size are cut.
    if spec.image_size is not None and (
        resampled or {cache.shape(s) for s in cache.study_ids} != {spec.image_size}
    ):
        notes.append(f"centre-cropped or padded to {list(spec.image_size)} voxels")
    return notes


@torch.inference_mode()
def extract_features(
    entry: EncoderEntry, cache: PreparedCache, device: torch.device, show_progress: bool = True
) -> Features:
    """`entry`'s pooled embedding of every study in `cache` (see the module docstring)."""
    preprocess = preprocessing(entry.spec)
    module = entry.module.to(device)
    values = []
    for study_id in progress(
        cache.study_ids, f"features {entry.label}", unit="study", disable=not show_progress
    ):
        volume = Volume(
            np.asarray(cache.image(study_id)),
            cache.affine(study_id),
            cache.spacing(study_id),
            {"source": study_id},
        )
        image = preprocess(volume).to(device)
        values.append(module(image).pooled.float().cpu().numpy()[0])
    return Features(list(cache.study_ids), np.stack(values))


def cached_features(
    entry: EncoderEntry,
    cache: PreparedCache,
    features_dir: Path,
    device: torch.device,
    show_progress: bool = True,
    reuse: bool = True,
) -> Features:
    """`extract_features`, read from `features_dir` when this encoder, spec and cache were seen before.

    reuse: False extracts again (and overwrites what is kept).
    """
    path = Path(features_dir) / f"{features_key(entry, cache)}.npz"
    if reuse and path.is_file():
        with np.load(path) as stored:
            logger.info("features of %s read from %s", entry.label, path)
            return Features([str(s) for s in stored["study_ids"]], stored["values"])
    features = extract_features(entry, cache, device, show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        np.savez(handle, study_ids=np.asarray(features.study_ids), values=features.values)
    return features
