"""Fixtures of the pretraining tests: a tiny offline text model and contract-shaped batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fm3d.text import init_text_model

# A 16^3 volume with 8^3 patches: 8 tokens, a few milliseconds per vit3d_tiny step on CPU.
TINY_ENCODER = {"img_size": [16, 16, 16], "patch_size": [8, 8, 8]}
REPORTS = [
    "liver lesion in segment four",
    "normal chest ct without findings",
    "kidney stone in the left kidney",
    "small pleural effusion on the right",
]


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A from-scratch 1-layer BERT with a WordPiece vocabulary learned on a few reports."""
    directory = tmp_path_factory.mktemp("text_model")
    return init_text_model(directory, REPORTS * 4, vocab_size=80, hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="session")
def batch_factory():
    """`make_batch(batch_size, ...)`: contract-shaped batches (see below)."""
    return make_batch


def make_batch(
    batch_size: int,
    num_phenotypes: int = 3,
    num_tasks: int = 2,
    has_report: bool | list[bool] = True,
    has_ehr: bool | list[bool] = True,
    seed: int = 0,
) -> dict:
    """A batch in the data contract (ARCHITECTURE.md) with random 16^3 images and labels."""
    g = torch.Generator().manual_seed(seed)
    mask = lambda v: torch.tensor([v] * batch_size if isinstance(v, bool) else v)  # noqa: E731
    reports = mask(has_report)
    ehr = mask(has_ehr)
    return {
        "image": torch.randn(batch_size, 1, 16, 16, 16, generator=g),
        "study_id": [f"s{seed}-{i}" for i in range(batch_size)],
        "report": [REPORTS[(seed + i) % len(REPORTS)] if reports[i] else "" for i in range(batch_size)],
        "has_report": reports,
        "phenotype": (torch.rand(batch_size, num_phenotypes, generator=g) > 0.5).float() * ehr[:, None],
        "has_ehr": ehr,
        "tte_time": torch.rand(batch_size, num_tasks, generator=g) * 1000 * ehr[:, None],
        "tte_event": (torch.rand(batch_size, num_tasks, generator=g) > 0.5) & ehr[:, None],
    }
