"""Multi-label tables and scores: metrics against sklearn on resamples with repeats, ties and unknowns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from downstream.evaluation.multilabel import LabelMatrix, MultiLabelScores, MultiLabelTable
from downstream.evaluation.protocol import ProtocolError


def _random_labels(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, LabelMatrix]:
    # Probabilities on a coarse grid (ties, and exactly 0.5), some labels unknown for some studies.
    probabilities = rng.integers(0, 11, size=(n, k)) / 10
    positive = rng.random((n, k)) < 0.3 + 0.4 * probabilities
    known = rng.random((n, k)) > 0.15
    return probabilities, LabelMatrix([f"l{j}" for j in range(k)], positive & known, known)


def _sklearn(probabilities: np.ndarray, labels: LabelMatrix, rows: np.ndarray) -> dict[str, float]:
    expected = {}
    for j, name in enumerate(labels.names):
        keep = rows[labels.known[rows, j]]
        y, p = labels.positive[keep, j], probabilities[keep, j]
        if y.all() or not y.any():
            expected |= {f"{m}/{name}": math.nan for m in ("auroc", "balanced_accuracy", "f1")}
            continue
        expected[f"auroc/{name}"] = roc_auc_score(y, p)
        expected[f"balanced_accuracy/{name}"] = balanced_accuracy_score(y, p > 0.5)
        expected[f"f1/{name}"] = f1_score(y, p > 0.5)
    for metric in ("auroc", "balanced_accuracy", "f1"):
        defined = [v for key, v in expected.items() if key.startswith(f"{metric}/") and not math.isnan(v)]
        expected[f"{metric}_macro"] = float(np.mean(defined)) if defined else math.nan
    return expected


def test_scores_equal_sklearn_on_resamples_with_repeats_ties_and_unknowns() -> None:
    rng = np.random.default_rng(0)
    probabilities, labels = _random_labels(rng, n=50, k=8)
    score = MultiLabelScores(probabilities, labels)
    resamples = [np.arange(50), *(rng.integers(0, 50, size=50) for _ in range(30))]
    for rows in resamples:
        got, expected = score(rows), _sklearn(probabilities, labels, rows)
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[m] for m in expected], list(expected.values()), rtol=0, atol=1e-12)


def test_a_label_with_one_class_is_nan_and_left_out_of_the_macro() -> None:
    probabilities = np.array([[0.9, 0.2], [0.1, 0.7], [0.6, 0.4], [0.3, 0.8]])
    positive = np.array([[True, False], [False, True], [True, False], [False, True]])
    known = np.array([[True, False], [True, True], [True, False], [True, True]])
    score = MultiLabelScores(probabilities, LabelMatrix(["a", "b"], positive, known))
    only_positive_b = score(np.array([1, 3, 3]))  # "a" all negative, "b" all positive
    assert math.isnan(only_positive_b["auroc/a"]) and math.isnan(only_positive_b["f1/a"])
    assert math.isnan(only_positive_b["auroc/b"])
    assert math.isnan(only_positive_b["auroc_macro"]) and math.isnan(only_positive_b["f1_macro"])
    one_defined = score(np.array([0, 1, 1, 2]))  # "a" both classes; "b" known only in row 1
    assert one_defined["auroc/a"] == 1.0 and one_defined["auroc_macro"] == 1.0
    assert math.isnan(one_defined["auroc/b"]) and math.isnan(one_defined["balanced_accuracy/b"])


def test_per_label_table_counts_the_known_studies() -> None:
    probabilities, labels = _random_labels(np.random.default_rng(1), n=40, k=3)
    table = MultiLabelScores(probabilities, labels).table()
    assert table["label"].to_list() == ["l0", "l1", "l2"]
    assert table["n"].to_list() == labels.known.sum(axis=0).tolist()
    assert table["positives"].to_list() == labels.positive.sum(axis=0).tolist()
    assert table["auroc"][1] == pytest.approx(
        roc_auc_score(labels.positive[labels.known[:, 1], 1], probabilities[labels.known[:, 1], 1])
    )


def test_label_table_reads_booleans_nulls_and_unlisted_studies(tmp_path: Path) -> None:
    path = tmp_path / "labels.parquet"
    pl.DataFrame(
        {
            "study_id": ["s1", "s2", "s3"],
            "nodule": [True, None, False],
            "effusion": [False, True, True],
            "report": ["a", "b", "c"],
            "count": [3, 4, 5],
            "flag": [1, 0, None],
        }
    ).write_parquet(path)
    table = MultiLabelTable(path, None, "protocols.linear_probe")
    assert table.names == ["nodule", "effusion", "flag"]
    labels = table.matrix(["s3", "s2", "unlisted", "s1"])
    np.testing.assert_array_equal(labels.known, [[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(labels.positive, [[0, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]])
    with pytest.raises(ProtocolError, match=r"in the train split, nodule \(1 positive, 0 negative\)"):
        table.require_both_classes(table.matrix(["s1"]), "train")


def test_label_table_takes_0_1_columns_of_a_csv_and_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("study_id,nodule,size_mm\n0012,1,4.5\n0013,0,\n")
    table = MultiLabelTable(path, None, "protocols.knn")
    assert table.names == ["nodule"]
    np.testing.assert_array_equal(table.matrix(["0012", "0013"]).positive, [[True], [False]])
    with pytest.raises(
        ProtocolError, match=r"no label column\(s\) \['effusion'\].*protocols\.knn\.label_columns"
    ):
        MultiLabelTable(path, ["nodule", "effusion"], "protocols.knn")
    with pytest.raises(ProtocolError, match=r"\['size_mm'\] are not boolean"):
        MultiLabelTable(path, ["size_mm"], "protocols.knn")
    with pytest.raises(ProtocolError, match="does not exist"):
        MultiLabelTable(tmp_path / "missing.parquet", None, "protocols.knn")
