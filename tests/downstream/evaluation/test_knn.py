"""kNN: probabilities against sklearn's KNeighborsClassifier (cosine), and a run on the demo cohort."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from downstream.evaluation.multilabel import LabelMatrix
from downstream.evaluation.protocol import EvalContext, ProtocolError, build_protocol
from downstream.evaluation.protocols.knn import knn_probabilities

# conftest.protocol_context: (encoder folder, work dir[, fractions, label]) -> EvalContext.
ContextFactory = Callable[..., EvalContext]


def _sklearn(train: np.ndarray, labels: LabelMatrix, query: np.ndarray, k: int) -> np.ndarray:
    expected = np.empty((len(query), len(labels.names)))
    for j in range(len(labels.names)):
        rows = labels.known[:, j]
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(
            train[rows], labels.positive[rows, j]
        )
        expected[:, j] = reference.predict_proba(query)[:, list(reference.classes_).index(True)]
    return expected


@pytest.mark.parametrize("k", [1, 5, 10])
def test_probabilities_equal_sklearn_cosine_neighbours(k: int) -> None:
    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(120, 12)) + 0.5, rng.normal(size=(40, 12)) + 0.5
    positive = rng.random((120, 4)) < [0.1, 0.3, 0.5, 0.7]
    known = rng.random((120, 4)) > [0.0, 0.1, 0.3, 0.0]
    labels = LabelMatrix(["a", "b", "c", "d"], positive & known, known)
    np.testing.assert_allclose(knn_probabilities(train, labels, query, k), _sklearn(train, labels, query, k))


def test_run_scores_the_test_studies_with_their_neighbours(
    protocol_context: ContextFactory, eval_cohort: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    context = protocol_context(tiny_encoder_dir, tmp_path)
    knn = build_protocol("knn", {"labels": str(eval_cohort / "findings.parquet"), "k": 5})
    result = knn.run(context)
    test_ids, train_ids = context.studies.ids("test"), context.studies.ids("train")
    assert result.study_ids == test_ids and result.selected == {"k": 5} and knn.headline == "auroc_macro"
    scores = result.score(np.arange(len(test_ids)))
    assert {"auroc_macro", "balanced_accuracy_macro", "f1_macro"} <= scores.keys()
    features = context.features()
    expected = _sklearn(features.rows(train_ids), knn.table.matrix(train_ids), features.rows(test_ids), 5)
    np.testing.assert_allclose(result.score.probabilities, expected)


def test_user_errors_name_the_file_and_the_setting(
    protocol_context: ContextFactory, eval_cohort: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    labels = str(eval_cohort / "findings.parquet")
    with pytest.raises(ProtocolError, match=r"findings\.parquet: has no label column\(s\) \['no_such'\]"):
        build_protocol("knn", {"labels": labels, "label_columns": ["no_such"]})
    too_many = build_protocol("knn", {"labels": labels, "k": 1000})
    with pytest.raises(ProtocolError, match=r"protocols\.knn\.k is 1000 but only \d+ train studies"):
        too_many.run(protocol_context(tiny_encoder_dir, tmp_path))
