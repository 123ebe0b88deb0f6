"""Patient-level bootstrap intervals, and paired intervals of the difference between two encoders.

A resample draws patients with replacement and takes every test study of each drawn patient (a
patient's studies are not independent, so resampling studies would give intervals too narrow).
Every encoder is scored on the same resamples, so the difference to the reference encoder is
paired: the interval of the per-resample difference, much tighter than two separate intervals.
Intervals are percentile intervals; a resample on which a metric is undefined (NaN: an AUROC of a
label with one class in it) is left out of that metric's interval, and the count kept is
reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from downstream.evaluation.protocol import ScoreFunction


def patient_resamples(patient_ids: Sequence[str], resamples: int, seed: int) -> list[np.ndarray]:
    """Row indices of `resamples` draws of patients with replacement, each with all its rows."""
    patients, rows_of = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    members = [np.flatnonzero(rows_of == p) for p in range(len(patients))]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(resamples, len(patients)))
    return [np.concatenate([members[p] for p in draw]) for draw in draws]


@dataclass(frozen=True)
class Interval:
    """A point value with its percentile interval over the resamples where it was defined."""

    value: float
    low: float
    high: float
    resamples: int

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below zero."""
        return bool(self.low > 0 or self.high < 0)


def percentile_interval(value: float, draws: np.ndarray, confidence: float) -> Interval:
    """`value` with the central `confidence` percentile interval of its finite `draws`."""
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return Interval(float(value), float("nan"), float("nan"), 0)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high), int(finite.size))


def resampled_metrics(score: ScoreFunction, resamples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """metric -> its value on every resample (NaN where undefined)."""
    values: dict[str, list[float]] = {}
    for rows in resamples:
        for metric, value in score(rows).items():
            values.setdefault(metric, []).append(float(value))
    return {metric: np.asarray(v, dtype=np.float64) for metric, v in values.items()}
