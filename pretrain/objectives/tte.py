"""Time-to-event pretraining: MOTOR's piecewise-exponential head on the pooled CT embedding.

The head and its censored negative log-likelihood are `ehr.tte` (MOTOR, Steinberg et al.,
2023); this objective feeds them the batch's `tte_time` [B, T] (days to event or censoring)
and `tte_event` [B, T], masking studies without EHR (`has_ehr` False) and tasks with an
unknown time (NaN): those pairs still pass through the head and contribute exactly 0.
Validation ranks studies per task by the predicted cumulative hazard at `horizon_days`
and reports Harrell's C (`ehr.metrics.harrell_c`) averaged over tasks with events.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ehr.metrics import SurvivalMetricError, harrell_c
from ehr.tte import PiecewiseExponentialHead, piecewise_exponential_nll
from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import Objective, ObjectiveError, require, row_mask
from pretrain.objectives.gather import gather_rows

logger = logging.getLogger(__name__)


def doubling_bin_edges(num_bins: int, max_time_days: float) -> list[float]:
    """`num_bins` bins from 0 to +inf whose widths double up to `max_time_days`.

    [0, m/2^(B-2), ..., m/2, m, inf]: fine resolution early, where most events of a cohort
    fall, without having to look at the data. Fit quantile edges with
    `ehr.tte.fit_bin_edges` on the training labels when you can, as MOTOR does.
    """
    if num_bins < 1 or max_time_days <= 0:
        raise ObjectiveError(f"need num_bins >= 1 and max_time_days > 0, got {num_bins} and {max_time_days}")
    inner = [max_time_days / 2**power for power in range(num_bins - 2, -1, -1)] if num_bins > 1 else []
    return [0.0, *inner, math.inf]


def _complete_edges(edges: Sequence[float]) -> list[float]:
    """Accept edges with or without the leading 0 and trailing +inf (YAML writes inf as .inf)."""
    edges = [float(e) for e in edges]
    if not edges or edges[0] != 0.0:
        edges = [0.0, *edges]
    if not math.isinf(edges[-1]):
        edges = [*edges, math.inf]
    return edges


class TimeToEventObjective(Objective):
    """Piecewise-exponential time-to-event loss for T tasks on the pooled embedding (MOTOR).

    Args:
        embed_dim: the encoder's pooled width.
        num_tasks: T, the width of `batch["tte_time"]`.
        bin_edges_days: bin edges in days (leading 0 and trailing inf optional); default
            `doubling_bin_edges(num_bins, max_time_days)`.
        num_bins, max_time_days: used only without `bin_edges_days`.
        rank: low rank of MOTOR's per-bin projection.
        horizon_days: time at which the cumulative hazard ranks studies for the validation
            C-index; default the last finite bin edge.
    The head starts at a hazard of one event per `horizon_days` for every task (not the 1 per
    day of a zero bias, whose loss on times of years would be in the thousands); call
    `init_from_labels` with the training labels to start from each task's own rate, as MOTOR does.
    Loss: mean NLL per observed (study, task) pair. Metric: `event_rate` of the batch.
    Validation: `c_index` (mean Harrell's C over tasks with events; how many is logged, not tracked).
    """

    name = "tte"
    views = ("image",)
    batch_keys = ("image", "tte_time", "tte_event")

    def __init__(
        self,
        embed_dim: int,
        num_tasks: int,
        bin_edges_days: list[float] | None = None,
        num_bins: int = 8,
        max_time_days: float = 3650.0,
        rank: int = 64,
        horizon_days: float | None = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ObjectiveError(f"num_tasks must be >= 1, got {num_tasks}")
        edges = (
            _complete_edges(bin_edges_days) if bin_edges_days else doubling_bin_edges(num_bins, max_time_days)
        )
        try:
            self.head = PiecewiseExponentialHead(embed_dim, num_tasks, edges, rank=rank)
        except ValueError as error:
            raise ObjectiveError(f"time-to-event bin edges {edges} are unusable: {error}") from error
        self.num_tasks = num_tasks
        finite = [e for e in edges if math.isfinite(e) and e > 0]
        self.horizon_days = (
            float(horizon_days) if horizon_days is not None else (finite[-1] if finite else 365.0)
        )
        with torch.no_grad():
            self.head.task_layer.bias.fill_(-math.log(self.horizon_days))
        self._val: list[tuple[torch.Tensor, ...]] = []

    def init_from_labels(
        self, time_days: torch.Tensor, event: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """Start each task at its rate in the training labels, log(events / time at risk) (MOTOR)."""
        self.head.init_task_bias_(time_days, event, mask)

    def _head(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]):
        pooled = encoded["image"].pooled  # [B, C]
        time = torch.as_tensor(require(batch, "tte_time", self.name), device=pooled.device).float()  # [B, T]
        event = torch.as_tensor(require(batch, "tte_event", self.name), device=pooled.device).bool()  # [B, T]
        if time.shape != (pooled.shape[0], self.num_tasks) or event.shape != time.shape:
            raise ObjectiveError(
                f"batch['tte_time'] {tuple(time.shape)} and ['tte_event'] {tuple(event.shape)} must be "
                f"[B, num_tasks] = {(pooled.shape[0], self.num_tasks)}; set num_tasks to the labels' width"
            )
        observed = row_mask(batch, "has_ehr", pooled.shape[0], pooled.device)[:, None] & torch.isfinite(time)
        observed &= time >= 0
        return self.head(pooled.float()), time, event & observed, observed  # log hazard [B, bins, T]

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        log_hazard, time, event, observed = self._head(batch, encoded)
        loss = piecewise_exponential_nll(log_hazard, time, event, self.head.bin_edges_days, observed)
        event_rate = (event.sum() / observed.sum().clamp_min(1)).detach().float()
        return loss, {"event_rate": event_rate}

    def reset_validation(self) -> None:
        self._val = []

    @torch.no_grad()
    def update_validation(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]) -> None:
        log_hazard, time, event, observed = self._head(batch, encoded)
        horizon = torch.tensor([self.horizon_days], dtype=log_hazard.dtype, device=log_hazard.device)
        risk = self.head.cumulative_hazard(log_hazard, horizon)[:, 0]  # [B, T]
        self._val.append((risk, torch.nan_to_num(time), event, observed))

    @torch.no_grad()
    def compute_validation(self) -> dict[str, float]:
        """Harrell's C per task over every rank's validation studies, averaged over tasks with events."""
        device = self.head.bin_projection.weight.device
        if self._val:
            parts = [torch.cat(p) for p in zip(*self._val, strict=True)]
        else:
            empty = torch.zeros(0, self.num_tasks, device=device)
            parts = [empty, empty, empty.bool(), empty.bool()]
        risk, time, event, observed = (gather_rows(p, with_grad=False)[0].cpu().numpy() for p in parts)
        scores = []
        for task in range(self.num_tasks):
            keep = observed[:, task].astype(bool)
            if not event[keep, task].any():
                continue
            try:
                scores.append(harrell_c(time[keep, task], event[keep, task], risk[keep, task]))
            except SurvivalMetricError as error:
                logger.debug("task %d skipped in the validation C-index: %s", task, error)
        if not scores:
            logger.info("time-to-event C-index skipped: no task has an event with comparable pairs")
            return {}
        logger.info("time-to-event C-index over the %d tasks with comparable pairs", len(scores))
        return {"c_index": float(np.mean(scores))}
