"""kNN: each test study's findings voted by its k most similar train studies (cosine similarity).

Nothing is fitted, so it shows what the embedding's neighbourhoods hold without a probe's
choices. Features are L2-normalised; for each label, the neighbours are the k train studies
with the highest cosine similarity among those where the label is known, and the probability of
the label is the fraction of them positive for it (sklearn's KNeighborsClassifier(k,
metric="cosine").predict_proba, which the tests compare it with). Scored like the linear probe.
"""

from __future__ import annotations

import numpy as np

from downstream.evaluation.multilabel import LabelMatrix, MultiLabelScores, MultiLabelTable
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    register_protocol,
)

SETTING = "protocols.knn"


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(features.dtype).tiny)


def knn_probabilities(train: np.ndarray, labels: LabelMatrix, query: np.ndarray, k: int) -> np.ndarray:
    """Probabilities [Q, K]: per label, the positive fraction of each query's k nearest known train rows."""
    similarity = l2_normalise(query) @ l2_normalise(train).T  # [Q, N]
    probabilities = np.empty((len(query), len(labels.names)))
    for j in range(len(labels.names)):
        known = np.flatnonzero(labels.known[:, j])
        nearest = np.argpartition(-similarity[:, known], k - 1, axis=1)[:, :k]  # [Q, k]
        probabilities[:, j] = labels.positive[known[nearest], j].mean(axis=1)
    return probabilities


@register_protocol("knn")
class KNearestNeighbours(Protocol):
    """Cosine kNN of multi-label findings (see the module docstring).

    labels: the label table (study_id + one boolean column per finding).
    label_columns: the findings to score; null takes every boolean column.
    k: neighbours per vote.
    """

    headline = "auroc_macro"

    def __init__(self, labels: str, label_columns: list[str] | None = None, k: int = 10) -> None:
        if k < 1:
            raise ProtocolError(f"{SETTING}.k must be at least 1, got {k}")
        self.table = MultiLabelTable(labels, label_columns, SETTING)
        self.k = int(k)

    def run(self, context: EvalContext) -> ProtocolResult:
        features = context.features()
        train_ids, test_ids = context.studies.ids("train"), context.studies.ids("test")
        train_labels = self.table.matrix(train_ids)
        self.table.require_both_classes(train_labels, "train")
        known = train_labels.known.sum(axis=0)
        if known.min() < self.k:
            label = train_labels.names[int(known.argmin())]
            raise ProtocolError(
                f"{SETTING}.k is {self.k} but only {known.min()} train studies have a known {label} "
                f"in {self.table.path}; lower k or give the suite more studies"
            )
        probabilities = knn_probabilities(
            features.rows(train_ids), train_labels, features.rows(test_ids), self.k
        )
        scores = MultiLabelScores(probabilities, self.table.matrix(test_ids))
        return ProtocolResult(
            study_ids=test_ids, score=scores, selected={"k": self.k}, tables={"per_label": scores.table()}
        )
