"""Fixtures of the language-task tests (zero-shot, retrieval, report generation): tiny offline models.

Built once per session from the demo cohort's reports: an encoder export (the tiny vit3d of the
downstream CLI tests), a from-scratch BERT text tower, a CLIP export around both (`save_clip`,
untrained heads: the tests check arithmetic and plumbing, not accuracy) and tiny GPT-2 / LLaMA
causal LMs with a byte-level BPE vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch

import fm3d
from downstream.language.causal_lm import init_causal_lm
from fm3d.clip import ClipConfig, ClipModel, save_clip
from fm3d.text import init_text_model

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "image_size": (16, 32, 32)}


@pytest.fixture(scope="session")
def language_kit(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Paths of the tiny encoder, text tower, CLIP and LMs, plus the demo's study ids and reports."""
    root = tmp_path_factory.mktemp("language")
    manifest = pl.read_parquet(demo_cohort / "manifest.parquet")
    reports = [f"{f}\n{i}" for f, i in zip(manifest["findings"], manifest["impression"], strict=True)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = fm3d.create_encoder("vit3d_tiny", **TINY)
        fm3d.save_encoder(encoder, root / "encoder")
        text = init_text_model(
            root / "text",
            reports * 3,
            vocab_size=200,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            max_length=128,
        )
        config = ClipConfig(
            image_embed_dim=32, text_model=str(text), proj_dim=16, pooling="mean", max_length=128
        )
        save_clip(ClipModel(config), root / "clip")
    lms = {
        family: init_causal_lm(root / family, reports * 3, family=family, vocab_size=300, hidden_size=32)
        for family in ("gpt2", "llama")
    }
    return SimpleNamespace(
        root=root,
        cohort=demo_cohort,
        cache=demo_cohort / "cache",
        encoder=root / "encoder",
        clip=root / "clip",
        text=text,
        lm=lms,
        studies=manifest["study_id"].to_list(),
        reports=dict(zip(manifest["study_id"], reports, strict=True)),
    )
