"""fm3d.metrics.retrieval: recall@K and mAP by hand, tie handling by enumeration, mAP vs scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import label_ranking_average_precision_score

from fm3d.metrics.retrieval import cosine_similarity, mean_average_precision, recall_at_k, retrieval_metrics


def test_recall_by_hand_without_ties():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # query 0: its item ranks 1st
            [0.8, 0.5, 0.7],  # query 1: 3rd
            [0.1, 0.3, 0.2],  # query 2: 2nd
        ]
    )
    assert recall_at_k(scores, ks=(1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    # Columns retrieve rows: item 0 -> query 0 1st; item 1 -> query 1 1st (0.5 > 0.3, 0.1);
    # item 2 -> query 2 ties query 0 behind query 1.
    metrics = retrieval_metrics(scores, ks=(1,))
    assert metrics["i2t_recall_at_1"] == pytest.approx(1 / 3)
    assert metrics["t2i_recall_at_1"] == pytest.approx(2 / 3)
    # AP with one relevant item is 1 / rank: (1 + 1/3 + 1/2) / 3.
    assert metrics["i2t_mAP"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def _recall_by_enumeration(row: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Average over every order of the items consistent with the scores (ties permuted)."""
    hits = orders = 0
    for permutation in itertools.permutations(range(len(row))):
        ranked = sorted(permutation, key=lambda i: -row[i])  # stable sort keeps the permuted tie order
        hits += bool(relevant[ranked[:k]].any())
        orders += 1
    return hits / orders


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_recall_ties_are_the_expectation_over_tie_orders(k):
    scores = np.array([[0.5, 0.5, 0.5, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3, 0.3], [0.7, 0.1, 0.7, 0.7, 0.0]])
    relevance = np.array(
        [
            [True, False, True, False, False],
            [False, False, True, False, False],
            [False, True, True, False, True],
        ]
    )
    expected = np.mean([_recall_by_enumeration(s, r, k) for s, r in zip(scores, relevance, strict=True)])
    got = recall_at_k(torch.tensor(scores), torch.tensor(relevance), ks=(k,))[k]
    assert got == pytest.approx(expected)


def test_constant_scores_give_chance():
    n = 8
    scores = torch.zeros(n, n)
    assert recall_at_k(scores, ks=(1, 5))[1] == pytest.approx(1 / n)
    assert recall_at_k(scores, ks=(1, 5))[5] == pytest.approx(5 / n)
    assert mean_average_precision(scores) == pytest.approx(1 / n)


def test_map_matches_sklearn_with_ties_and_several_relevant():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(12, 9)).astype(float)  # many ties
    relevance = rng.random((12, 9)) < 0.3
    relevance[:, 0] |= ~relevance.any(1)  # sklearn needs a relevant item per row
    expected = label_ranking_average_precision_score(relevance, scores)
    assert mean_average_precision(torch.tensor(scores), torch.tensor(relevance)) == pytest.approx(expected)


def test_queries_without_relevant_items_are_skipped():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    relevance = torch.tensor([[True, False], [False, False]])
    assert recall_at_k(scores, relevance, ks=(1,))[1] == 1.0
    assert mean_average_precision(scores, relevance) == 1.0


def test_cosine_similarity_and_shape_errors():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(cosine_similarity(a, a).diagonal(), torch.ones(2))
    assert cosine_similarity(a, a)[0, 1].item() == pytest.approx(2**-0.5)
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool))
