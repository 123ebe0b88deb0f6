"""Survival protocol: MOTOR's piecewise-exponential head fitted on an encoder's frozen features.

Labels are the `fm3d ehr labels` parquet (tte_time / tte_event lists over MOTOR tasks, task
names in its description), read with fm3d's `LabelTable` as the survival fine-tuning task's data
module reads them; studies without EHR (has_ehr false, null times) are left out. The head
(`ehr.tte.PiecewiseExponentialHead`, bins at quantiles of the training event times, task biases
at each task's exponential rate) is fitted by full-batch Adam on the censored NLL of the train
split's standardised features, once per weight decay; the one with the best mean Harrell's C on
val is scored on test, as `downstream/tasks/survival.py` scores its head (`ehr.metrics`):
- `c_index/<task>`: Harrell's C of the risk = cumulative hazard at the horizon (default: median
  training follow-up);
- `td_c_index/<task>`: MOTOR's time-dependent C of each bin's log hazard;
- `ibs/<task>`: the integrated Brier score (IPCW, censoring fitted on train) of the predicted
  survival curves over the 10th-80th percentiles of the test follow-up;
and their means over the tasks where they are defined.

Resampled rows (the bootstrap's, repeats allowed) count a study drawn m times as m studies: its
pairs with every other study count m times, its copies never form a comparable pair with each
other (equal times), and its Brier terms weigh m times. The IBS grid and the censoring estimate
stay those of the full test set and the train split, so every resample estimates the same
integral; a resample whose follow-up does not cover the grid gets NaN, left out of the interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from downstream.base import finite_mean
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    one_thread,
    register_protocol,
)
from ehr.errors import TaskSpecError
from ehr.labels import read_label_description
from ehr.metrics import defined_or_nan, harrell_c, ibs_times, integrated_brier_score, time_dependent_c
from ehr.tte import PiecewiseExponentialHead, fit_bin_edges
from fm3d.data.tables import LabelTable, read_table

logger = logging.getLogger(__name__)

OUTCOME_COLUMNS = ("tte_time", "tte_event")
# The head's low-rank projection size: the survival fine-tuning task's default.
HEAD_RANK = 32


@dataclass(frozen=True)
class Outcomes:
    """Times to event or censoring (days) and event flags [N, K] of `study_ids`, in row order."""

    study_ids: list[str]
    time: np.ndarray
    event: np.ndarray


class SurvivalLabels:
    """The chosen tasks of an `fm3d ehr labels` parquet, for the studies with usable EHR."""

    def __init__(self, path: str | Path, tasks: list[str] | None) -> None:
        self.path = Path(path)
        table = read_table(self.path)
        missing = [c for c in OUTCOME_COLUMNS if c not in table.columns]
        if missing:
            raise ProtocolError(
                f"protocols.survival.labels: {self.path} lacks the columns {missing}; "
                "write it with `fm3d ehr labels`"
            )
        # Rows without EHR or without outcome lists carry no outcome: leave them out here, so
        # LabelTable (which refuses null lists) reads the others.
        usable = pl.col("tte_time").is_not_null() & pl.col("tte_event").is_not_null()
        if "has_ehr" in table.columns:
            usable &= pl.col("has_ehr").fill_null(False).cast(pl.Boolean)
        self._table = LabelTable(table.filter(usable), OUTCOME_COLUMNS, self.path)
        names = self._stored_task_names()
        if tasks is None:
            self.task_names, self._columns = names, list(range(len(names)))
        else:
            unknown = [t for t in tasks if t not in names]
            if unknown or not tasks:
                raise ProtocolError(
                    f"protocols.survival.tasks: {unknown or '(empty list)'} are not tasks of {self.path} "
                    f"(it has {names}); list some of those, or null for all"
                )
            self.task_names, self._columns = list(tasks), [names.index(t) for t in tasks]

    def _stored_task_names(self) -> list[str]:
        width = self._table.widths["tte_time"]
        try:
            names = [str(n) for n in read_label_description(self.path).get("tasks", [])]
        except TaskSpecError:  # a table written by other tools: number its tasks
            names = []
        return names if len(names) == width else [f"task_{k}" for k in range(width)]

    def outcomes(self, study_ids: list[str]) -> Outcomes:
        """The outcomes of those of `study_ids` the table lists with EHR and finite times."""
        kept, times, events = [], [], []
        for study_id in study_ids:
            arrays, present = self._table.get(study_id)
            time = arrays["tte_time"][self._columns].astype(np.float64)
            if present and np.isfinite(time).all():
                kept.append(study_id)
                times.append(time)
                events.append(arrays["tte_event"][self._columns].astype(bool))
        width = len(self._columns)
        return Outcomes(
            kept,
            np.stack(times) if times else np.zeros((0, width)),
            np.stack(events) if events else np.zeros((0, width), dtype=bool),
        )


@dataclass(frozen=True)
class SurvivalPredictions:
    """A fitted head's predictions of the test studies, made once so a resample only indexes them.

    risk: [N, K] cumulative hazard at the horizon. log_hazard: [N, B, K] per bin, with
    `bin_edges` [B + 1]. survival[k]: [N, T_k] S(t) at `ibs_times[k]` (None: no grid fits).
    train: the train split's outcomes (the censoring distribution of the IPCW weights).
    """

    outcomes: Outcomes
    task_names: list[str]
    risk: np.ndarray
    log_hazard: np.ndarray
    bin_edges: np.ndarray
    ibs_times: list[np.ndarray | None]
    survival: list[np.ndarray | None]
    train: Outcomes

    def task_metrics(self, rows: np.ndarray, k: int) -> dict[str, float]:
        """Harrell's C, time-dependent C and IBS of task `k` on `rows` (repeats allowed)."""
        time, event = self.outcomes.time[rows, k], self.outcomes.event[rows, k]
        metrics = {
            "c_index": defined_or_nan(lambda: harrell_c(time, event, self.risk[rows, k])),
            "td_c_index": defined_or_nan(
                lambda: time_dependent_c(time, event, self.log_hazard[rows, :, k], self.bin_edges)
            ),
            "ibs": float("nan"),
        }
        if self.ibs_times[k] is not None:
            metrics["ibs"] = defined_or_nan(
                lambda: integrated_brier_score(
                    self.train.time[:, k],
                    self.train.event[:, k],
                    time,
                    event,
                    self.survival[k][rows],
                    self.ibs_times[k],
                )
            )
        return metrics

    def __call__(self, rows: np.ndarray) -> dict[str, float]:
        """Every task's metrics on `rows`, and their means over the tasks that define them."""
        rows = np.asarray(rows, dtype=np.int64)
        per_task = [self.task_metrics(rows, k) for k in range(len(self.task_names))]
        scores = {}
        for metric in ("c_index", "td_c_index", "ibs"):
            values = np.array([m[metric] for m in per_task])
            scores[f"{metric}_mean"] = finite_mean(values)
            scores.update(
                {f"{metric}/{name}": float(v) for name, v in zip(self.task_names, values, strict=True)}
            )
        return scores


def fit_head(
    features: torch.Tensor,
    outcomes: Outcomes,
    bin_edges: torch.Tensor,
    weight_decay: float,
    epochs: int,
    lr: float,
    seed: int,
) -> PiecewiseExponentialHead:
    """A piecewise-exponential head fitted by full-batch Adam on the censored NLL of `outcomes`.

    Weight decay applies to every parameter but the task biases c_k: they hold each task's log
    base rate (about -7 for a daily hazard), which decay would drag towards a hazard of one a day.
    """
    with torch.random.fork_rng(devices=[]):  # the same start for every weight decay; global RNG untouched
        torch.manual_seed(seed)
        head = PiecewiseExponentialHead(features.shape[1], outcomes.time.shape[1], bin_edges, rank=HEAD_RANK)
    head.init_task_bias_(torch.from_numpy(outcomes.time), torch.from_numpy(outcomes.event))
    head.to(features.device)
    base_rate = head.task_layer.bias
    decayed = [p for p in head.parameters() if p is not base_rate]
    optimizer = torch.optim.Adam(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": [base_rate], "weight_decay": 0.0}],
        lr=lr,
    )
    time = torch.from_numpy(outcomes.time).to(features)
    event = torch.from_numpy(outcomes.event).to(features.device)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        head.loss(head(features), time, event).backward()
        optimizer.step()
    return head.eval()


def risk_at(head: PiecewiseExponentialHead, log_hazard: torch.Tensor, horizon_days: float) -> np.ndarray:
    """The cumulative hazard at the horizon [N, K]: the risk that ranks studies for Harrell's C."""
    horizon = torch.tensor([horizon_days]).to(log_hazard)
    return head.cumulative_hazard(log_hazard, horizon)[:, 0].double().cpu().numpy()


@torch.no_grad()
def mean_c_index(
    head: PiecewiseExponentialHead, x: torch.Tensor, outcomes: Outcomes, horizon_days: float
) -> float:
    """Harrell's C of the head's risks, averaged over the tasks that define it (NaN if none)."""
    if not outcomes.study_ids:
        return float("nan")
    risk = risk_at(head, head(x), horizon_days)
    time, event = outcomes.time, outcomes.event
    return finite_mean(
        np.array(
            [
                defined_or_nan(lambda k=k: harrell_c(time[:, k], event[:, k], risk[:, k]))
                for k in range(risk.shape[1])
            ]
        )
    )


@torch.no_grad()
def predict(
    head: PiecewiseExponentialHead,
    x: torch.Tensor,
    test: Outcomes,
    horizon_days: float,
    train: Outcomes,
    task_names: list[str],
) -> SurvivalPredictions:
    """The head's risks, per-bin log hazards and survival curves of the test studies."""
    log_hazard = head(x)  # [N, B, K]
    grids = [ibs_times(test.time[:, k]) for k in range(test.time.shape[1])]
    curves = []
    for k, times in enumerate(grids):
        if times is None:
            curves.append(None)
        else:
            survival = head.survival(log_hazard, torch.from_numpy(times).to(log_hazard))  # [N, T, K]
            curves.append(survival[:, :, k].double().cpu().numpy())
    return SurvivalPredictions(
        outcomes=test,
        task_names=task_names,
        risk=risk_at(head, log_hazard, horizon_days),
        log_hazard=log_hazard.double().cpu().numpy(),
        bin_edges=head.bin_edges_days.cpu().numpy(),
        ibs_times=grids,
        survival=curves,
        train=train,
    )


@register_protocol("survival")
class Survival(Protocol):
    """Time-to-event probe: MOTOR's piecewise-exponential head on frozen features (module docstring).

    Args:
        labels: the `fm3d ehr labels` parquet of the suite's studies.
        tasks: task names to score (as the labels' description lists them); None = all.
        epochs: full-batch Adam steps per fit.
        lr: Adam's learning rate.
        weight_decays: the grid searched on val (Adam's L2 on every parameter but the task base
            rates; the first is used when val has no events to select with).
        num_bins: piecewise-exponential bins, at quantiles of the train split's event times.
        horizon_days: where the cumulative hazard ranks studies for Harrell's C; None = the
            median train follow-up.
    """

    headline = "c_index_mean"

    def __init__(
        self,
        labels: str | Path,
        tasks: list[str] | None = None,
        epochs: int = 300,
        lr: float = 1e-3,
        weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1),
        num_bins: int = 8,
        horizon_days: float | None = None,
    ) -> None:
        if not weight_decays:
            raise ProtocolError("protocols.survival.weight_decays is empty; list at least one, e.g. [0.0]")
        self.labels = SurvivalLabels(labels, tasks)
        self.epochs, self.lr = int(epochs), float(lr)
        self.weight_decays = [float(w) for w in weight_decays]
        self.num_bins = int(num_bins)
        self.horizon_days = horizon_days

    def run(self, context: EvalContext) -> ProtocolResult:
        """Fit on train per weight decay, select on val by mean Harrell's C, score on test."""
        splits = {s: self.labels.outcomes(context.studies.ids(s)) for s in ("train", "val", "test")}
        train, val, test = splits["train"], splits["val"], splits["test"]
        if not train.event.any():
            raise ProtocolError(
                f"protocols.survival: the train split has no observed event in {self.labels.path} "
                f"({len(train.study_ids)} studies with EHR); add studies or change data.split_fractions"
            )
        if not test.study_ids:
            raise ProtocolError(
                f"protocols.survival: no test study has EHR in {self.labels.path}; check its study_id "
                "values against the cache's and its has_ehr column"
            )
        features = context.features()
        train_x = features.rows(train.study_ids).astype(np.float64)
        mean, std = train_x.mean(0), train_x.std(0)
        std[std == 0] = 1.0

        def standardised(outcomes: Outcomes) -> torch.Tensor:
            rows = (features.rows(outcomes.study_ids).astype(np.float64) - mean) / std
            return torch.as_tensor(rows, dtype=torch.float32, device=context.device)

        x = {name: standardised(o) for name, o in splits.items()}
        edges = fit_bin_edges(train.time[train.event], self.num_bins)
        horizon = float(np.median(train.time)) if self.horizon_days is None else float(self.horizon_days)

        best, best_head, val_scores = 0, None, []
        with one_thread():
            for i, weight_decay in enumerate(self.weight_decays):
                head = fit_head(x["train"], train, edges, weight_decay, self.epochs, self.lr, context.seed)
                val_scores.append(mean_c_index(head, x["val"], val, horizon))
                # Ties keep the first; NaN (no val events) ranks below every C, so it only wins when all are.
                ranked = np.nan_to_num(val_scores, nan=-1.0)
                if best_head is None or ranked[i] > ranked[best]:
                    best, best_head = i, head
        if not np.isfinite(val_scores).any():
            logger.warning(
                "survival: val has no events to select a weight decay; using %s", self.weight_decays[0]
            )

        predictions = predict(best_head, x["test"], test, horizon, train, self.labels.task_names)
        figures = predictions(np.arange(len(test.study_ids)))
        per_task = pl.DataFrame(
            {
                "task": self.labels.task_names,
                **{
                    m: [figures[f"{m}/{t}"] for t in self.labels.task_names]
                    for m in ("c_index", "td_c_index", "ibs")
                },
                "test_events": test.event.sum(0).tolist(),
                "train_events": train.event.sum(0).tolist(),
                "test_studies": [len(test.study_ids)] * len(self.labels.task_names),
            }
        )
        grid = pl.DataFrame({"weight_decay": self.weight_decays, "val_c_index_mean": val_scores})
        selected = {
            "weight_decay": self.weight_decays[best],
            "val_c_index_mean": val_scores[best],
            "horizon_days": horizon,
            "bin_edges_days": edges.tolist(),
        }
        return ProtocolResult(
            test.study_ids, predictions, selected, {"per_task": per_task, "weight_decays": grid}
        )
