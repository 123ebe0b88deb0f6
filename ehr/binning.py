"""Time-bin edges from quantiles of event times, shared by the TTE head and the label writer.

Kept in numpy so label building (a data job) never needs torch.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ehr.errors import EHRSettingError

logger = logging.getLogger(__name__)


def quantile_bin_edges(event_times_days: np.ndarray, num_bins: int) -> list[float]:
    """`[0, q_1, ..., q_{B-1}, inf]` at equally spaced quantiles of the observed event times.

    MOTOR places edges so every bin sees roughly the same number of events. NaN and negative
    times are ignored; coinciding quantiles are merged, so fewer than `num_bins` bins may come
    back (with a warning).
    """
    if num_bins < 1:
        raise EHRSettingError(f"num_bins must be >= 1, got {num_bins}")
    times = np.asarray(event_times_days, dtype=np.float64).ravel()
    times = times[np.isfinite(times) & (times >= 0)]
    if times.size == 0:
        raise EHRSettingError("bin edges need at least one observed event time (all were NaN/negative/empty)")
    inner = np.quantile(times, np.arange(1, num_bins) / num_bins) if num_bins > 1 else np.empty(0)
    inner = np.unique(inner[inner > 0])  # also sorts
    edges = [0.0, *inner.tolist(), math.inf]
    if len(edges) - 1 < num_bins:
        logger.warning(
            "%d of %d requested time bins remain after merging tied quantiles", len(edges) - 1, num_bins
        )
    return edges
