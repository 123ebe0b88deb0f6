"""pretrain.objectives.phenotype: BCE by hand with masks, gradients, AUROC vs scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.phenotype import PhenotypeObjective, macro_auroc


def _encoded(pooled: torch.Tensor) -> dict[str, EncoderOutput]:
    return {"image": EncoderOutput(tokens=pooled[:, None], pooled=pooled, grid=(1, 1, 1))}


def _bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_loss_by_hand_with_missing_ehr_and_unknown_labels():
    objective = PhenotypeObjective(2, 2)
    with torch.no_grad():
        objective.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        objective.head.bias.copy_(torch.tensor([0.0, -1.0]))
    pooled = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [3.0, 3.0]])  # logits [[1, 1], [-1, 0], [3, 5]]
    batch = {
        "phenotype": torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0]]),
        "has_ehr": torch.tensor([True, True, False]),
    }
    loss, metrics = objective(batch, _encoded(pooled))
    expected = (_bce(1, 1) + _bce(1, 0) + _bce(-1, 0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["positive_rate"].item() == pytest.approx(1 / 3)


def test_every_parameter_gets_a_gradient_without_ehr():
    objective = PhenotypeObjective(4, 3)
    pooled = torch.randn(2, 4, requires_grad=True)
    batch = {"phenotype": torch.zeros(2, 3), "has_ehr": torch.zeros(2, dtype=torch.bool)}
    loss, _ = objective(batch, _encoded(pooled))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in objective.parameters())


def test_macro_auroc_matches_sklearn_with_ties_and_masks():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(40, 4)).astype(float)  # ties
    labels = (rng.random((40, 4)) < 0.4).astype(float)
    labels[:, 3] = 0.0  # one phenotype never positive: left out
    observed = rng.random((40, 4)) < 0.8
    expected = np.mean(
        [roc_auc_score(labels[observed[:, j], j], scores[observed[:, j], j]) for j in range(3)]
    )
    auroc, evaluated = macro_auroc(scores, labels, observed)
    assert evaluated == 3
    assert auroc == pytest.approx(expected)


def test_validation_accumulates_batches():
    torch.manual_seed(0)
    objective = PhenotypeObjective(3, 2).eval()
    objective.reset_validation()
    batches = []
    for _ in range(3):
        pooled = torch.randn(4, 3)
        batch = {
            "phenotype": (torch.rand(4, 2) < 0.5).float(),
            "has_ehr": torch.tensor([True, True, True, False]),
        }
        objective.update_validation(batch, _encoded(pooled))
        batches.append((objective.head(pooled).detach(), batch))
    metrics = objective.compute_validation()
    logits = torch.cat([b[0][:3] for b in batches]).numpy()
    labels = torch.cat([b[1]["phenotype"][:3] for b in batches]).numpy()
    expected = np.mean(
        [roc_auc_score(labels[:, j], logits[:, j]) for j in range(2) if 0 < labels[:, j].sum() < 9]
    )
    assert metrics["auroc"] == pytest.approx(expected)
    objective.reset_validation()
    assert objective.compute_validation() == {}


def test_width_mismatch_is_a_clear_error():
    objective = PhenotypeObjective(4, 3)
    with pytest.raises(ObjectiveError, match="num_phenotypes"):
        objective({"phenotype": torch.zeros(2, 5)}, _encoded(torch.randn(2, 4)))
