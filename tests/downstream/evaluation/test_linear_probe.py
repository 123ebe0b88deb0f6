"""Linear probe: the torch fit against sklearn's LogisticRegression, and a run on the demo cohort."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from downstream.evaluation.multilabel import LabelMatrix
from downstream.evaluation.protocol import EvalContext, ProtocolError, build_protocol
from downstream.evaluation.protocols.linear_probe import fit_linear_probe, predict, standardise

# conftest.protocol_context: (encoder folder, work dir[, fractions, label]) -> EvalContext.
ContextFactory = Callable[..., EvalContext]


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_probe_equals_sklearn_balanced_logistic_regression(weight_decay: float) -> None:
    rng = np.random.default_rng(0)
    n, n_test, channels = 200, 100, 16
    x = rng.normal(size=(n + n_test, channels)) * rng.uniform(0.5, 3, channels) + rng.normal(size=channels)
    logits = (x - x.mean(axis=0)) / x.std(axis=0) @ rng.normal(size=(channels, 3)) - [1.0, 2.0, 0.0]
    positive = rng.random(logits.shape) < 1 / (1 + np.exp(-logits))  # imbalanced, not separable
    known = rng.random(logits.shape) > 0.1
    train, test = standardise(x[:n], x[n:])
    labels = LabelMatrix(["a", "b", "c"], positive[:n] & known[:n], known[:n])
    probabilities = predict(fit_linear_probe(train, labels, 0.1, weight_decay, 300, seed=0), test)
    for j in range(3):
        rows = known[:n, j]
        reference = LogisticRegression(
            C=1 / (rows.sum() * weight_decay), class_weight="balanced", tol=1e-10, max_iter=10_000
        ).fit(train[rows], positive[:n][rows, j])
        np.testing.assert_allclose(probabilities[:, j], reference.predict_proba(test)[:, 1], atol=1e-3)


def test_run_selects_on_val_and_scores_the_test_studies(
    protocol_context: ContextFactory, eval_cohort: Path, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    context = protocol_context(tiny_encoder_dir, tmp_path)
    settings = {"labels": str(eval_cohort / "findings.parquet"), "lrs": [1e-2, 1e-1],
                "weight_decays": [1e-3, 1e-1], "epochs": 100}  # fmt: skip
    probe = build_protocol("linear_probe", settings)
    global_rng = torch.get_rng_state()
    result = probe.run(context)
    assert torch.equal(torch.get_rng_state(), global_rng)

    test_ids = context.studies.ids("test")
    assert result.study_ids == test_ids and probe.headline == "auroc_macro"
    features = context.features()
    split = {s: features.rows(context.studies.ids(s)) for s in ("train", "val", "test")}
    mean, std = split["train"].mean(axis=0), split["train"].std(axis=0)
    train, val, test = ((split[s] - mean) / std for s in ("train", "val", "test"))
    labels = {s: probe.table.matrix(context.studies.ids(s)) for s in ("train", "val", "test")}

    def criterion(probabilities: np.ndarray, truth: LabelMatrix) -> float:
        per_label = [
            (balanced_accuracy_score(y, p > 0.5) + roc_auc_score(y, p)) / 2
            for y, p in zip(truth.positive.T, probabilities.T, strict=True)
            if 0 < y.sum() < len(y)
        ]
        return float(np.mean(per_label))

    grid = [(lr, wd) for lr in settings["lrs"] for wd in settings["weight_decays"]]
    layers = [fit_linear_probe(train, labels["train"], lr, wd, 100, seed=0) for lr, wd in grid]
    criteria = [criterion(predict(layer, val), labels["val"]) for layer in layers]
    best = next(i for i, c in enumerate(criteria) if c > max(criteria) - 1e-9)  # the first wins a tie
    assert (result.selected["lr"], result.selected["weight_decay"]) == grid[best]
    assert result.selected["val_score"] == pytest.approx(criteria[best])

    scores = result.score(np.arange(len(test_ids)))
    assert {"auroc_macro", "balanced_accuracy_macro", "f1_macro"} <= scores.keys()
    expected = predict(layers[best], test)
    np.testing.assert_allclose(result.score.probabilities, expected, atol=1e-6)
    for j, name in enumerate(labels["test"].names):
        y = labels["test"].positive[:, j]
        if 0 < y.sum() < len(y):
            assert scores[f"auroc/{name}"] == pytest.approx(roc_auc_score(y, expected[:, j]))
        else:
            assert np.isnan(scores[f"auroc/{name}"])
    table = result.tables["per_label"]
    assert table["n"].to_list() == [len(test_ids)] * len(labels["test"].names)


def test_missing_label_column_names_the_file_and_the_setting(eval_cohort: Path) -> None:
    labels = eval_cohort / "findings.parquet"
    with pytest.raises(
        ProtocolError, match=r"findings\.parquet: has no label column\(s\) \['no_such'\]"
    ) as error:
        build_protocol("linear_probe", {"labels": str(labels), "label_columns": ["emphysema", "no_such"]})
    assert "protocols.linear_probe.label_columns" in str(error.value)
    with pytest.raises(ProtocolError, match="unexpected keyword argument 'epoch'"):
        build_protocol("linear_probe", {"labels": str(labels), "epoch": 10})
