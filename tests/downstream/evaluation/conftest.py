"""Fixtures of the evaluation-suite tests: a small prepared demo cohort and tiny saved encoders."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import torch

import fm3d
from downstream.evaluation.encoders import load_entry
from downstream.evaluation.features import cached_features
from downstream.evaluation.protocol import EvalContext
from downstream.evaluation.studies import Studies
from fm3d.clip import ClipConfig, ClipModel, save_clip
from fm3d.data.cache import PreparedCache
from fm3d.data.prepare import prepare_cache
from fm3d.demo import generate_demo_cohort
from fm3d.text import init_text_model

CPU = torch.device("cpu")

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


@pytest.fixture(scope="session")
def clip_export(eval_cohort: Path, tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<run>/encoder` (the tiny encoder) beside `<run>/clip` (untrained heads, a from-scratch BERT)."""
    run = tmp_path_factory.mktemp("clip_run")
    shutil.copytree(tiny_encoder_dir, run / "encoder")
    manifest = pl.read_parquet(eval_cohort / "manifest.parquet")
    reports = [f"{f}\n{i}" for f, i in zip(manifest["findings"], manifest["impression"], strict=True)]
    text = init_text_model(
        tmp_path_factory.mktemp("text"), reports, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
        max_length=128,
    )  # fmt: skip
    config = ClipConfig(image_embed_dim=32, text_model=str(text), proj_dim=16, pooling="mean", max_length=128)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_clip(ClipModel(config), run / "clip")
    return run / "encoder"


@pytest.fixture(scope="session")
def protocol_context(eval_cohort: Path) -> Callable[..., EvalContext]:
    """Build the `EvalContext` a protocol gets in a suite: `protocol_context(encoder_dir, work_dir)`.

    The features of an encoder are extracted once per session (kept under the cohort's folder).
    """

    def build(
        encoder: Path,
        work_dir: Path,
        fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
        label: str = "tiny",
    ) -> EvalContext:
        cache = PreparedCache(eval_cohort / "cache")
        entry = load_entry(f"{label}={encoder}", seed=0)
        features = cached_features(entry, cache, eval_cohort / "features_protocols", CPU, show_progress=False)
        studies = Studies.from_cache(cache, fractions, 0)
        return EvalContext(entry, cache, studies, lambda: features, 0, CPU, work_dir)

    return build
