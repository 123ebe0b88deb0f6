"""Fixtures of the evaluation-suite tests: a small prepared demo cohort and tiny saved encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fm3d
from fm3d.data.prepare import prepare_cache
from fm3d.demo import generate_demo_cohort

# A tiny vit3d on the demo volume (48 x 96 x 96 voxels at 3 x 1.5 x 1.5 mm): four tokens a side
# at most, so extracting 24 studies takes a second or two on CPU.
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=(16, 32, 32), image_size=(48, 96, 96))


@pytest.fixture(scope="session")
def eval_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 demo studies: manifest, `findings.parquet`, MEDS, and the prepared `cache/`."""
    root = tmp_path_factory.mktemp("eval_cohort")
    manifest = generate_demo_cohort(root, num_studies=24, seed=0, progress=False)
    prepare_cache(manifest, root / "cache", progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fm3d export folder of a tiny vit3d (seeded weights) with the demo cache's input spec.

    Its seed is not the suites' (0), so `random:<this folder>` draws other weights.
    """
    torch.manual_seed(1234)
    encoder = fm3d.create_encoder("vit3d_tiny", **TINY_VIT)
    return fm3d.save_encoder(encoder, tmp_path_factory.mktemp("tiny_encoder") / "encoder")
