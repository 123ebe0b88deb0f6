"""Feature extraction: each encoder through its own input spec, cached by encoder and data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fm3d
from downstream.evaluation.encoders import EncoderSourceError, load_entries, load_entry
from downstream.evaluation.features import cached_features, features_key, input_notes
from fm3d.data.cache import PreparedCache

CPU = torch.device("cpu")


def test_features_are_the_encoder_on_its_own_preprocessing(eval_cohort: Path, tiny_encoder_dir: Path) -> None:
    cache = PreparedCache(eval_cohort / "cache")
    entry = load_entry(f"tiny={tiny_encoder_dir}", seed=0)
    features = cached_features(entry, cache, eval_cohort / "features_a", CPU, show_progress=False)
    study = cache.study_ids[3]
    volume = fm3d.read_volume(cache.row(study)["source_path"])  # the original file, as a user reads it
    encoder = fm3d.load_encoder(tiny_encoder_dir).eval()
    with torch.no_grad():
        expected = encoder(fm3d.preprocessing(encoder)(volume)).pooled[0].numpy()
    assert features.values.shape == (len(cache), 32)
    np.testing.assert_allclose(features.rows([study])[0], expected, atol=1e-4)


def test_cached_features_are_reused_and_keyed_by_weights(eval_cohort: Path, tiny_encoder_dir: Path) -> None:
    cache = PreparedCache(eval_cohort / "cache")
    folder = eval_cohort / "features_b"
    pretrained, random = load_entries([f"p={tiny_encoder_dir}", f"r=random:{tiny_encoder_dir}"], seed=0)
    assert pretrained.identity != random.identity and features_key(pretrained, cache) != features_key(
        random, cache
    )
    first = cached_features(pretrained, cache, folder, CPU, show_progress=False)
    (stored,) = folder.glob("*.npz")
    # A second read comes from the file, not from the encoder: break the encoder to prove it.
    pretrained.module.forward = None
    again = cached_features(pretrained, cache, folder, CPU, show_progress=False)
    np.testing.assert_array_equal(first.values, again.values)
    assert again.study_ids == first.study_ids and stored.is_file()
    # The same seed draws the same random weights; another seed other ones.
    assert load_entry(f"random:{tiny_encoder_dir}", seed=0).identity == random.identity
    assert load_entry(f"random:{tiny_encoder_dir}", seed=1).identity != random.identity


def test_input_notes_say_where_the_encoder_reads_the_cache_differently(eval_cohort: Path) -> None:
    cache = PreparedCache(eval_cohort / "cache")
    spec = cache.input_spec.replace(image_size=(48, 96, 96))
    assert input_notes(spec, cache) == []
    notes = input_notes(spec.replace(target_spacing_mm=(2.0, 2.0, 2.0), hu_window=(-2000, 1000)), cache)
    assert any("resampled from [3.0, 1.5, 1.5] to [2.0, 2.0, 2.0] mm" in n for n in notes)
    assert any("wider than the cache's" in n for n in notes)
    assert "centre-cropped or padded to [48, 96, 96] voxels" in notes
    assert input_notes(spec.replace(image_size=(32, 96, 96)), cache) == [
        "centre-cropped or padded to [32, 96, 96] voxels"
    ]


def test_unknown_encoder_names_the_choices() -> None:
    with pytest.raises(EncoderSourceError, match="vit3d_tiny"):
        load_entry("no/such/encoder", seed=0)
    with pytest.raises(EncoderSourceError, match="share the label"):
        load_entries(["a=vit3d_tiny", "a=vit3d_tiny"], seed=0)
