"""Survival metrics: Harrell's C, Uno's C, MOTOR's time-dependent C and the integrated Brier score.

All functions take numpy-compatible arrays (times in any unit, events as bools, higher risk =
earlier event) and return a Python float. Harrell's C, Uno's C and the integrated Brier score
follow scikit-survival's conventions exactly (`concordance_index_censored`,
`concordance_index_ipcw`, `integrated_brier_score`), which the tests check to 1e-6; the
censoring distribution is the reverse Kaplan-Meier estimate G(t) = P(C > t), right-continuous.
Pairs are compared in blocks so memory stays O(block x N) while the work is O(events x N).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fm3d.errors import Fm3dError

_BLOCK = 1024  # event rows compared against all samples at once


# Where the integrated Brier score is evaluated: these quantiles of the evaluated follow-up, so
# the grid stays inside the follow-up the IPCW weights can cover.
IBS_QUANTILES = np.linspace(0.1, 0.8, 8)


class SurvivalMetricError(Fm3dError, ValueError):
    """Inputs a survival metric cannot be computed from (no comparable pairs, bad shapes, times)."""


def _as_arrays(time, event, risk=None):
    time = np.asarray(time, dtype=np.float64).ravel()
    event = np.asarray(event).astype(bool).ravel()
    if time.shape != event.shape:
        raise SurvivalMetricError(f"time and event differ in length: {time.shape[0]} vs {event.shape[0]}")
    if risk is None:
        return time, event
    risk = np.asarray(risk, dtype=np.float64)
    if risk.shape[0] != time.shape[0]:
        raise SurvivalMetricError(f"risk has {risk.shape[0]} rows but there are {time.shape[0]} times")
    return time, event, risk


def _weighted_concordance(time, event, risk, weights, tied_tol):
    """sum_i w_i (#concordant + 0.5 #tied risk) / sum_i w_i #comparable, over events i.

    j is comparable to event i when t_j > t_i, or t_j == t_i and j is censored (Harrell).
    """
    numerator = denominator = 0.0
    rows = np.flatnonzero(event & (weights > 0))
    if rows.size == 0 and not event.any():
        raise SurvivalMetricError("all samples are censored: the concordance index is undefined")
    for start in range(0, rows.size, _BLOCK):
        i = rows[start : start + _BLOCK]
        t_i, r_i = time[i, None], risk[i, None]
        comparable = (time[None, :] > t_i) | ((time[None, :] == t_i) & ~event[None, :])
        tied = np.abs(risk[None, :] - r_i) <= tied_tol
        concordant = (risk[None, :] < r_i) & ~tied
        numerator += np.sum(
            weights[i] * ((concordant & comparable).sum(1) + 0.5 * (tied & comparable).sum(1))
        )
        denominator += np.sum(weights[i] * comparable.sum(1))
    if denominator == 0:
        raise SurvivalMetricError("no comparable pairs: the concordance index is undefined")
    return float(numerator / denominator)


def harrell_c(time, event, risk, tied_tol: float = 1e-8) -> float:
    """Harrell's concordance index: the share of comparable pairs ordered correctly by risk.

    A pair is comparable when the earlier time is an event (or both times are equal and only
    one is an event); pairs with risks within `tied_tol` count 1/2.
    """
    time, event, risk = _as_arrays(time, event, risk)
    return _weighted_concordance(time, event, risk.ravel(), np.ones_like(time), tied_tol)


class _CensoringKM:
    """Reverse Kaplan-Meier estimate of G(t) = P(censored after t), fitted on training times."""

    def __init__(self, time: np.ndarray, event: np.ndarray) -> None:
        self.unique_time, inverse = np.unique(time, return_inverse=True)
        n_at = np.bincount(inverse, minlength=self.unique_time.size)
        n_censored = np.bincount(inverse, weights=~event, minlength=self.unique_time.size)
        n_events = n_at - n_censored
        at_risk = n_at[::-1].cumsum()[::-1] - n_events  # events at t leave before censoring at t
        ratio = np.divide(n_censored, at_risk, out=np.zeros_like(n_censored), where=n_censored > 0)
        self.prob = np.cumprod(1.0 - ratio)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        beyond = t > self.unique_time[-1]
        if self.prob[-1] > 0 and beyond.any():
            raise SurvivalMetricError(
                f"time {t[beyond].max()} is beyond the last training time {self.unique_time[-1]}: "
                "the censoring distribution is unknown there; pass a smaller tau / times"
            )
        idx = np.searchsorted(self.unique_time, t, side="right") - 1
        out = np.where(idx >= 0, self.prob[np.clip(idx, 0, None)], 1.0)
        return np.where(beyond, 0.0, out)


def uno_c(
    time_train, event_train, time, event, risk, tau: float | None = None, tied_tol: float = 1e-8
) -> float:
    """Uno's IPCW concordance index, truncated at `tau` (Uno et al., Stat Med 2011).

    Like Harrell's C, but each comparable pair with earlier event time t_i < tau is weighted by
    1 / G(t_i)^2, with G the censoring survival estimated on the training set, which removes
    the dependence on the test set's censoring pattern.
    """
    time_train, event_train = _as_arrays(time_train, event_train)
    time, event, risk = _as_arrays(time, event, risk)
    censoring = _CensoringKM(time_train, event_train)
    weights = np.zeros_like(time)
    keep = event if tau is None else event & (time < tau)
    g = censoring(time[keep])
    if (g == 0).any():
        raise SurvivalMetricError("censoring survival is zero at an event time: choose a smaller tau")
    weights[keep] = 1.0 / g**2
    if not event.any():
        raise SurvivalMetricError("all samples are censored: the concordance index is undefined")
    return _weighted_concordance(time, event, risk.ravel(), weights, tied_tol)


def time_dependent_c(time, event, risk, bin_edges=None) -> float:
    """MOTOR's time-dependent C-statistic: a survival-weighted average of AUROCs over event times.

    Follows femr's `compute_c_statistic` (som-shahlab/femr, native/survival_metrics.cc, used
    for the MOTOR paper, Steinberg et al. 2023): walk the distinct event times t in order; at
    each, the cases are the samples with an event at t and the controls those with time > t
    (censored samples at t are neither). AUROC_t is the fraction of (case, control) pairs where
    the case has the higher risk, risk being read from the time bin containing t. With
    S the Kaplan-Meier-like survival updated at each event time (frac = cases / (cases +
    controls), S_next = S (1 - frac)), the pair weight is (S frac) * S_next, and the result is
    sum_t w_t AUROC_t / sum_t w_t; times without controls are skipped.

    One deliberate difference: femr breaks risk ties by sample order, here a tie counts 1/2
    (the expected value of a random tie break), so the result does not depend on row order.

    Args:
        time, event: [N] times and event flags.
        risk: [N] one score per sample, or [N, B] a score per time bin (e.g. hazards).
        bin_edges: with [N, B] risk, B start edges (bin b covers [edges[b], edges[b+1]));
            B + 1 edges ending in +inf (as `ehr.tte.fit_bin_edges` gives) are accepted too.
    """
    time, event, risk = _as_arrays(time, event, risk)
    if risk.ndim == 1:
        risk, starts = risk[:, None], np.zeros(1)
    else:
        if bin_edges is None:
            raise SurvivalMetricError("risk per time bin ([N, B]) needs bin_edges")
        starts = np.asarray(bin_edges, dtype=np.float64)
        if starts.size == risk.shape[1] + 1 and np.isinf(starts[-1]):
            starts = starts[:-1]
        if starts.size != risk.shape[1]:
            raise SurvivalMetricError(f"{starts.size} bin edges for risk with {risk.shape[1]} bins")
    event_times = np.unique(time[event])
    if event_times.size == 0:
        raise SurvivalMetricError("all samples are censored: the time-dependent C is undefined")
    surv, total, total_weight = 1.0, 0.0, 0.0
    for t in event_times:
        column = risk[:, max(int(np.searchsorted(starts, t, side="right")) - 1, 0)]
        cases = column[event & (time == t)]
        controls = np.sort(column[time > t])
        frac = cases.size / (cases.size + controls.size)
        next_surv = surv * (1 - frac)
        if controls.size:
            below = np.searchsorted(controls, cases, side="left")
            ties = np.searchsorted(controls, cases, side="right") - below
            auroc = (below.sum() + 0.5 * ties.sum()) / (cases.size * controls.size)
            weight = surv * frac * next_surv
            total += weight * auroc
            total_weight += weight
        surv = next_surv
    if total_weight == 0:
        raise SurvivalMetricError("no event time has later samples to compare with")
    return float(total / total_weight)


def integrated_brier_score(time_train, event_train, time, event, survival_probs, times) -> float:
    """Integrated Brier score (Graf et al. 1999) with IPCW, trapezoid rule over `times`.

    At each t: mean over samples of S(t)^2 / G(t_i) for events by t, plus (1 - S(t))^2 / G(t)
    for samples still event-free after t; integrated over `times` and divided by their span.

    Args:
        survival_probs: [N, T] predicted P(T > times[j]) for each test sample.
        times: [T] increasing times within the test follow-up (at least two).
    """
    time_train, event_train = _as_arrays(time_train, event_train)
    time, event = _as_arrays(time, event)
    times = np.asarray(times, dtype=np.float64).ravel()
    probs = np.asarray(survival_probs, dtype=np.float64).reshape(time.size, -1)
    if times.size < 2 or probs.shape[1] != times.size:
        raise SurvivalMetricError(
            f"need >= 2 times matching survival_probs columns, got {times.size} / {probs.shape}"
        )
    if np.any(np.diff(times) <= 0):
        raise SurvivalMetricError("times must be strictly increasing")
    if times[-1] >= time.max() or times[0] < time.min():
        raise SurvivalMetricError(f"times must lie within the test follow-up [{time.min()}, {time.max()})")
    censoring = _CensoringKM(time_train, event_train)
    g_t = censoring(times)
    g_y = censoring(time)
    g_t[g_t == 0] = np.inf
    g_y[g_y == 0] = np.inf
    is_case = (time[:, None] <= times[None, :]) & event[:, None]
    is_control = time[:, None] > times[None, :]
    brier = np.mean(probs**2 * is_case / g_y[:, None] + (1 - probs) ** 2 * is_control / g_t[None, :], axis=0)
    return float(np.trapezoid(brier, times) / (times[-1] - times[0]))


def ibs_times(time: np.ndarray) -> np.ndarray | None:
    """The IBS grid of one task's evaluated times: distinct quantiles strictly inside the follow-up.

    None when fewer than two remain (too few distinct times to integrate over).
    """
    times = np.unique(np.quantile(time, IBS_QUANTILES))
    times = times[(times > time.min()) & (times < time.max())]
    return times if times.size >= 2 else None


def defined_or_nan(compute: Callable[[], float]) -> float:
    """`compute()`, or NaN where the rows cannot define the metric (no events, no comparable pairs)."""
    try:
        return float(compute())
    except SurvivalMetricError:
        return float("nan")
