"""Survival metrics against scikit-survival on random data and hand-computed small cases."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.metrics import integrated_brier_score as sksurv_ibs
from sksurv.util import Surv

from ehr.metrics import SurvivalMetricError, harrell_c, integrated_brier_score, time_dependent_c, uno_c


def random_survival(seed: int, n: int, integer_times: bool):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    event_time = rng.exponential(scale=np.exp(-risk) * 10)
    censor_time = rng.exponential(scale=12, size=n)
    time = np.minimum(event_time, censor_time)
    if integer_times:  # many tied times, as days in EHR data
        time = np.ceil(time)
    event = event_time <= censor_time
    noisy_risk = risk + rng.normal(scale=0.7, size=n)
    if integer_times:
        noisy_risk = np.round(noisy_risk, 1)  # tied risks too
    return time, event, noisy_risk


@pytest.mark.parametrize("seed,integer_times", [(0, False), (1, True), (2, True)])
def test_harrell_matches_sksurv(seed, integer_times):
    time, event, risk = random_survival(seed, 300, integer_times)
    expected = concordance_index_censored(event, time, risk)[0]
    assert harrell_c(time, event, risk) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed,integer_times,tau", [(3, False, None), (4, True, None), (5, True, 8.0)])
def test_uno_matches_sksurv(seed, integer_times, tau):
    time_train, event_train, _ = random_survival(seed, 400, integer_times)
    time, event, risk = random_survival(seed + 100, 250, integer_times)
    if tau is None:  # test times must lie inside the training follow-up
        keep = time < time_train.max()
        time, event, risk = time[keep], event[keep], risk[keep]
    y_train, y_test = Surv.from_arrays(event_train, time_train), Surv.from_arrays(event, time)
    expected = concordance_index_ipcw(y_train, y_test, risk, tau=tau)[0]
    assert uno_c(time_train, event_train, time, event, risk, tau=tau) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed,integer_times", [(6, False), (7, True)])
def test_integrated_brier_matches_sksurv(seed, integer_times):
    time_train, event_train, _ = random_survival(seed, 400, integer_times)
    time, event, risk = random_survival(seed + 100, 200, integer_times)
    keep = time < time_train.max()
    time, event, risk = time[keep], event[keep], risk[keep]
    times = np.linspace(np.percentile(time, 10), np.percentile(time, 80), 15)
    times = np.unique(times)
    probs = np.exp(-np.outer(np.exp(risk) / 10, times))  # exponential-model survival curves
    y_train, y_test = Surv.from_arrays(event_train, time_train), Surv.from_arrays(event, time)
    expected = sksurv_ibs(y_train, y_test, probs, times)
    got = integrated_brier_score(time_train, event_train, time, event, probs, times)
    assert got == pytest.approx(expected, abs=1e-6)


def test_harrell_hand_case_with_ties():
    # times 1(event) 2(event) 2(censored) 3(event) 4(censored); risks with one tie.
    time = np.array([1, 2, 2, 3, 4], dtype=float)
    event = np.array([True, True, False, True, False])
    risk = np.array([0.9, 0.5, 0.5, 0.7, 0.1])
    # comparable pairs (event first): (0,1) c, (0,2) c, (0,3) c, (0,4) c,
    # (1,2) same time, 2 censored -> comparable, risks tied -> 1/2,
    # (1,3) 0.5<0.7 discordant, (1,4) c, (3,4) c.  => (6 + 0.5) / 8
    assert harrell_c(time, event, risk) == pytest.approx(6.5 / 8)


def test_uno_hand_case():
    # Train: censoring at 2 and 4 -> G(t) = 1 for t < 2, 1 - 1/4 = 0.75 on [2, 4), 0.375 from 4.
    time_train = np.array([1, 2, 3, 4, 5], dtype=float)
    event_train = np.array([True, False, True, False, True])
    time = np.array([1, 3, 4.5], dtype=float)
    event = np.array([True, True, False])
    risk = np.array([0.2, 0.9, 0.1])
    # event 0 (t=1, w=1): vs 1 discordant, vs 2 concordant; event 1 (t=3, w=1/0.75^2): vs 2 concordant.
    w1 = 1 / 0.75**2
    expected = (1 * 1 + w1 * 1) / (1 * 2 + w1 * 1)
    assert uno_c(time_train, event_train, time, event, risk) == pytest.approx(expected)


def test_time_dependent_c_hand_case():
    # Event times 1 and 3; at t=1 the controls are everything with time > 1 (4 of them).
    time = np.array([1, 2, 3, 5, 6], dtype=float)
    event = np.array([True, False, True, False, True])
    risk = np.array([0.8, 0.9, 0.5, 0.1, 0.5])
    # t=1: case 0.8 vs controls [0.9, 0.5, 0.1, 0.5] -> 3/4; frac=1/5, S: 1 -> 0.8, w=0.2*0.8
    # t=3: case 0.5 vs controls [0.1, 0.5] -> (1 + 0.5)/2; frac=1/3, S: 0.8 -> 0.8*2/3, w=0.8/3*0.8*2/3
    # t=6: no controls -> skipped
    w1, w2 = 0.2 * 0.8, (0.8 / 3) * (0.8 * 2 / 3)
    expected = (w1 * 0.75 + w2 * 0.75) / (w1 + w2)
    assert time_dependent_c(time, event, risk) == pytest.approx(expected)


def test_time_dependent_c_reads_the_bin_of_each_event_time():
    time = np.array([1, 2, 12, 20], dtype=float)
    event = np.array([True, False, True, False])
    # bin 0 = [0, 10): sample 0 ranked highest; bin 1 = [10, inf): sample 2 ranked lowest.
    risk = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, -1.0], [0.2, 0.0]])
    # t=1 (bin 0): case 1.0 vs [0.0, 0.5, 0.2] -> 1; t=12 (bin 1): case -1.0 vs [0.0] -> 0
    w1 = (1 / 4) * (3 / 4)
    w2 = (3 / 4) * (1 / 2) * (3 / 4) * (1 / 2)
    expected = w1 / (w1 + w2)
    assert time_dependent_c(time, event, risk, bin_edges=[0.0, 10.0, np.inf]) == pytest.approx(expected)
    assert time_dependent_c(time, event, risk, bin_edges=[0.0, 10.0]) == pytest.approx(expected)


def test_time_dependent_c_of_perfect_and_reversed_risk():
    time, event, _ = random_survival(8, 200, False)
    assert time_dependent_c(time, event, -time) == pytest.approx(1.0)
    assert time_dependent_c(time, event, time) == pytest.approx(0.0)


def test_errors_are_clear():
    with pytest.raises(SurvivalMetricError, match="all samples are censored"):
        harrell_c([1.0, 2.0], [False, False], [0.1, 0.2])
    with pytest.raises(SurvivalMetricError, match="needs bin_edges"):
        time_dependent_c([1.0, 2.0], [True, False], np.ones((2, 3)))
    with pytest.raises(SurvivalMetricError, match="beyond the last training time"):
        uno_c([1.0, 2.0, 3.0], [True, False, True], [1.0, 5.0], [True, True], [0.2, 0.1])
