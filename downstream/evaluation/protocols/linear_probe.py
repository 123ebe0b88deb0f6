"""Linear probe: one linear layer on frozen, standardised features, one logistic output per finding.

As the 3D CT foundation-model challenge kit runs it: features standardised with the train
split's mean and std; a linear layer [C -> K] trained full batch with Adam for `epochs` steps on
class-balanced binary cross-entropy (per label, sample weights n / (2 n_class) as sklearn's
class_weight="balanced", over the studies where the label is known) plus an L2 penalty on the
weights, not the bias. Per label the objective

    mean_i w_i BCE_i + weight_decay / 2 * ||W_k||^2

is sklearn's LogisticRegression(C = 1 / (n * weight_decay), class_weight="balanced"), which
the tests compare it with. Every (lr, weight_decay) of the grid is fitted on train; the one with
the best mean over labels of (balanced accuracy + AUROC) / 2 on val scores the test split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from downstream.evaluation.multilabel import (
    LabelMatrix,
    MultiLabelScores,
    MultiLabelTable,
    selection_criterion,
)
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    one_thread,
    register_protocol,
)

SETTING = "protocols.linear_probe"
CPU = torch.device("cpu")


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """`train` and `others` scaled by the train mean and std (a constant feature keeps std 1)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear_probe(
    features: np.ndarray,
    labels: LabelMatrix,
    lr: float,
    weight_decay: float,
    epochs: int,
    seed: int,
    device: torch.device = CPU,
) -> torch.nn.Linear:
    """A linear layer [C -> K] fitted on standardised `features` [N, C] (see the module docstring)."""
    x = torch.as_tensor(features, dtype=torch.float32, device=device)  # [N, C]
    y = torch.as_tensor(labels.positive, dtype=torch.float32, device=device)  # [N, K]
    known = torch.as_tensor(labels.known, device=device)
    positives, negatives = (
        torch.as_tensor(c, dtype=torch.float32, device=device) for c in labels.class_counts()
    )
    # class_weight="balanced" per label (n / (2 n_class)) divided by n, so that the sum over its
    # known studies is the weighted mean; studies where the label is unknown weigh nothing.
    weights = torch.where(known, torch.where(y > 0, 1 / (2 * positives), 1 / (2 * negatives)), 0.0)  # [N, K]
    # torch.nn.Linear's own initial range, drawn from the seed instead of the global generator.
    layer = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], y.shape[1])
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / np.sqrt(x.shape[1])
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    layer.to(device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        losses = F.binary_cross_entropy_with_logits(layer(x), y, reduction="none")  # [N, K]
        # Labels are independent problems: the sum over labels of each one's objective.
        loss = (weights * losses).sum() + weight_decay / 2 * layer.weight.square().sum()
        loss.backward()
        optimizer.step()
    return layer.eval()


@torch.no_grad()
def predict(layer: torch.nn.Linear, features: np.ndarray) -> np.ndarray:
    """Probabilities [N, K] of a fitted probe on standardised features."""
    weight = layer.weight
    x = torch.as_tensor(features, dtype=weight.dtype, device=weight.device)
    return torch.sigmoid(layer(x)).cpu().double().numpy()


@register_protocol("linear_probe")
class LinearProbe(Protocol):
    """Linear probe of multi-label findings (see the module docstring).

    labels: the label table (study_id + one boolean column per finding).
    label_columns: the findings to probe; null takes every boolean column.
    lrs, weight_decays: the grid (Adam learning rates, L2 penalties on the weights).
    epochs: full-batch Adam steps per fit.
    """

    headline = "auroc_macro"

    def __init__(
        self,
        labels: str,
        label_columns: list[str] | None = None,
        lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1),
        weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1),
        epochs: int = 300,
    ) -> None:
        if not lrs or not weight_decays or epochs < 1:
            raise ProtocolError(f"{SETTING}: lrs and weight_decays need a value each and epochs >= 1")
        self.table = MultiLabelTable(labels, label_columns, SETTING)
        self.grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
        self.epochs = int(epochs)

    def run(self, context: EvalContext) -> ProtocolResult:
        features = context.features()
        ids = {split: context.studies.ids(split) for split in ("train", "val", "test")}
        labels = {split: self.table.matrix(s) for split, s in ids.items()}
        self.table.require_both_classes(labels["train"], "train")
        train, val, test = standardise(*(features.rows(ids[s]) for s in ("train", "val", "test")))
        layers, criteria = [], []
        with one_thread():
            for lr, wd in self.grid:
                layer = fit_linear_probe(
                    train, labels["train"], lr, wd, self.epochs, context.seed, context.device
                )
                val_scores = MultiLabelScores(predict(layer, val), labels["val"]).per_label(
                    np.arange(len(val))
                )
                layers.append(layer)
                criteria.append(selection_criterion(val_scores))
        if len(self.grid) > 1 and not np.isfinite(criteria).any():
            raise ProtocolError(
                f"{self.table.path}: no label has both classes among the {len(val)} val studies, so "
                f"{SETTING} cannot choose lr and weight_decay; give data.split_fractions a larger val "
                "part or give one lr and one weight_decay"
            )
        # The first grid point wins ties; NaN (nothing defined on val) never beats a number.
        best = int(np.argmax(np.nan_to_num(criteria, nan=-np.inf)))
        scores = MultiLabelScores(predict(layers[best], test), labels["test"])
        lr, wd = self.grid[best]
        return ProtocolResult(
            study_ids=ids["test"],
            score=scores,
            selected={"lr": lr, "weight_decay": wd, "val_score": criteria[best]},
            tables={"per_label": scores.table()},
        )
