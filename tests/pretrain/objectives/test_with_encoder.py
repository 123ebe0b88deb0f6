"""All four objectives on a real fm3d encoder and real VoCo crop labels: one backward reaches everything.

Studies without report or EHR in the whole batch are the hard case for DDP (a parameter
without a gradient hangs the reducer), so every mask here is all False except VoCo's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fm3d
from fm3d.data.crops import VOCO_TINY
from fm3d.text import init_text_model
from pretrain.objectives.clip import ClipObjective
from pretrain.objectives.phenotype import PhenotypeObjective
from pretrain.objectives.tte import TimeToEventObjective
from pretrain.objectives.voco import VoCoObjective

REPORTS = ["No acute abnormality.", "Right lung nodule.", "Hepatic cyst.", "Small effusion."]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    return str(init_text_model(tmp_path_factory.mktemp("text"), REPORTS * 3, vocab_size=100, hidden_size=16))


def _batch(batch_size: int = 2) -> dict:
    rng = np.random.default_rng(0)
    k, r, size = VOCO_TINY.num_bases, VOCO_TINY.num_random_crops, VOCO_TINY.crop_shape
    labels = [VOCO_TINY.overlap_labels(VOCO_TINY.draw_random_centres(rng)) for _ in range(batch_size)]
    return {
        "image": torch.randn(batch_size, 1, 32, 32, 32),
        "voco_bases": torch.randn(batch_size, k, 1, *size),
        "voco_crops": torch.randn(batch_size, r, 1, *size),
        "voco_labels": torch.tensor(np.stack(labels), dtype=torch.float32),
        "report": [""] * batch_size,
        "has_report": torch.zeros(batch_size, dtype=torch.bool),
        "phenotype": torch.zeros(batch_size, 3),
        "has_ehr": torch.zeros(batch_size, dtype=torch.bool),
        "tte_time": torch.zeros(batch_size, 2),
        "tte_event": torch.zeros(batch_size, 2, dtype=torch.bool),
    }


def test_all_objectives_backpropagate_into_the_encoder(text_model):
    torch.manual_seed(0)
    encoder = fm3d.create_encoder("vit3d_tiny", image_size=(32, 32, 32), patch_size=(8, 8, 8), depth=1)
    dim = encoder.embed_dim
    objectives = {
        "voco": VoCoObjective(dim, hidden_dim=32, out_dim=16),
        "clip": ClipObjective(dim, text_model, proj_dim=8, max_length=16),
        "phenotype": PhenotypeObjective(dim, 3),
        "tte": TimeToEventObjective(dim, 2, num_bins=3, rank=4),
    }
    batch = _batch()
    views = {view for objective in objectives.values() for view in objective.views}
    encoded = {}
    for view in views:
        x = batch[view]
        encoded[view] = encoder(x.flatten(0, 1) if x.ndim == 6 else x)  # the caller's flattening
    total = torch.zeros(())
    for name, objective in objectives.items():
        loss, metrics = objective(batch, encoded)
        assert torch.isfinite(loss), name
        assert all(torch.as_tensor(v).numel() == 1 for v in metrics.values()), name
        total = total + loss
    total.backward()
    for module in (encoder, *objectives.values()):
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
    for objective in objectives.values():
        objective.on_train_batch_end()
