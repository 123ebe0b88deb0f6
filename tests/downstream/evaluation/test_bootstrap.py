"""The patient-level bootstrap against closed forms, and the paired comparison of encoders."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from downstream.evaluation.bootstrap import patient_resamples, percentile_interval, resampled_metrics
from downstream.evaluation.protocol import ProtocolError, ProtocolResult
from downstream.evaluation.scores import score
from downstream.evaluation.studies import Studies
from downstream.evaluation.suite import NO_DIFFERENCE, compare


def mean_score(values: np.ndarray):
    return lambda rows: {"mean": float(values[rows].mean())}


def test_resamples_draw_whole_patients_with_replacement() -> None:
    patients = ["a", "a", "b", "c", "c", "c"]
    draws = patient_resamples(patients, resamples=200, seed=3)
    rows_of = {"a": {0, 1}, "b": {2}, "c": {3, 4, 5}}
    for rows in draws:
        drawn = [patients[r] for r in rows]
        for patient, members in rows_of.items():  # every copy of a patient brings all its rows
            assert drawn.count(patient) % len(members) == 0
        assert sum(drawn.count(p) // len(m) for p, m in rows_of.items()) == 3  # three patients a draw
    again = patient_resamples(patients, resamples=200, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(draws, again, strict=True))


def test_bootstrap_of_a_mean_matches_its_closed_form() -> None:
    """One study per patient: the bootstrap distribution of a mean has variance sigma^2 / n (ddof 0)."""
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 3.0, size=80)
    draws = patient_resamples([str(i) for i in range(80)], resamples=8000, seed=1)
    means = resampled_metrics(mean_score(values), draws)["mean"]
    standard_error = values.std() / np.sqrt(len(values))
    assert means.std() == pytest.approx(standard_error, rel=0.04)
    assert means.mean() == pytest.approx(values.mean(), abs=0.1 * standard_error)
    interval = percentile_interval(values.mean(), means, 0.95)
    assert interval.low == pytest.approx(values.mean() - 1.96 * standard_error, abs=0.15 * standard_error)
    assert interval.high == pytest.approx(values.mean() + 1.96 * standard_error, abs=0.15 * standard_error)


def test_patients_not_studies_are_the_unit() -> None:
    """Two identical studies per patient: the interval is that of the 40 patient means, not of 80 studies."""
    rng = np.random.default_rng(1)
    per_patient = rng.normal(0.0, 1.0, size=40)
    values = np.repeat(per_patient, 2)
    patients = [str(i) for i in np.repeat(np.arange(40), 2)]
    means = resampled_metrics(mean_score(values), patient_resamples(patients, 8000, 2))["mean"]
    assert means.std() == pytest.approx(per_patient.std() / np.sqrt(40), rel=0.05)


def test_undefined_resamples_are_left_out_and_counted() -> None:
    interval = percentile_interval(0.5, np.array([0.1, np.nan, 0.3, np.nan, 0.2]), 0.5)
    assert interval.resamples == 3 and (interval.low, interval.high) == pytest.approx((0.15, 0.25))
    assert percentile_interval(0.5, np.array([np.nan]), 0.95).resamples == 0


def _studies(n: int) -> Studies:
    ids = [f"s{i}" for i in range(n)]
    return Studies(
        pl.DataFrame({"study_id": ids, "patient_id": [f"p{i}" for i in range(n)], "split": ["test"] * n})
    )


def test_paired_difference_is_exact_for_a_constant_shift_and_aligned_by_study() -> None:
    rng = np.random.default_rng(2)
    values = rng.uniform(size=30)
    studies = _studies(30)
    ids = studies.ids("test")
    reference = ProtocolResult(ids, mean_score(values))
    # The same figures plus 0.1, with the rows in another order: pairing must follow study ids.
    order = rng.permutation(30)
    shifted = ProtocolResult([ids[i] for i in order], mean_score(values[order] + 0.1))
    same = ProtocolResult(ids, mean_score(values))
    scored = {label: score(result, studies, 500, seed=0) for label, result in
              {"a": reference, "b": shifted, "c": same}.items()}  # fmt: skip
    rows = {r["encoder"]: r for r in compare("p", scored, 0.95)}
    assert rows["a"]["verdict"] == "reference" and rows["a"]["diff"] is None
    assert rows["b"]["diff"] == pytest.approx(0.1)
    assert rows["b"]["diff_low"] == pytest.approx(0.1) and rows["b"]["diff_high"] == pytest.approx(0.1)
    assert rows["b"]["verdict"] == "higher"
    assert rows["c"]["diff_low"] == rows["c"]["diff_high"] == 0.0 and rows["c"]["verdict"] == NO_DIFFERENCE
    # Unpaired, the two intervals overlap almost wholly; paired, the difference is certain.
    assert rows["b"]["ci_low"] < rows["a"]["ci_high"]


def test_encoders_scored_on_different_studies_are_refused() -> None:
    studies = _studies(4)
    values = np.arange(4.0)
    a = ProtocolResult(["s0", "s1", "s2", "s3"], mean_score(values))
    b = ProtocolResult(["s0", "s1", "s2"], mean_score(values[:3]))
    with pytest.raises(ProtocolError, match="different test studies"):
        compare("p", {"a": score(a, studies, 10, 0), "b": score(b, studies, 10, 0)}, 0.95)
