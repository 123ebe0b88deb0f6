"""Time-to-event fine-tuning with MOTOR's piecewise-exponential head (`ehr.tte`).

The head reads the encoder's pooled embedding and predicts a log hazard per (time bin, task);
the loss is the censored piecewise-exponential NLL, masked for studies without EHR. Bin edges
are quantiles of the training split's event times (`ehr.tte.fit_bin_edges`) unless given, and
the task biases start at each task's prefit exponential rate. Metrics per task (`ehr.metrics`):
Harrell's C-index of the risk = cumulative hazard at `horizon_days` (default: median training
follow-up), and the integrated Brier score (IPCW, censoring fitted on the training split) over
the 10th-80th percentiles of the evaluated follow-up times. Figures: Kaplan-Meier curves of
the low- and high-risk halves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from downstream.base import DownstreamTask, Evaluation, StepOutput, finite_mean
from downstream.data import SurvivalDataModule
from downstream.registry import register_task
from ehr.metrics import defined_or_nan, harrell_c, ibs_times, integrated_brier_score
from ehr.tte import PiecewiseExponentialHead, fit_bin_edges
from fm3d.errors import Fm3dError


class SurvivalSetupError(Fm3dError, RuntimeError):
    """The survival head cannot be built (no bin edges given and no training events to fit them)."""


@register_task("survival")
class SurvivalTask(DownstreamTask):
    """Time-to-event prediction for `task_names` (e.g. death, cancer diagnosis) from one CT.

    Args:
        task_names: one name per time-to-event task (linked from the data module).
        num_bins: piecewise-exponential bins fitted to training event times.
        bin_edges_days: explicit edges (0, ..., inf) instead of fitted ones.
        rank: the head's low-rank projection size.
        horizon_days: time at which the cumulative hazard ranks studies for the C-index.
        kwargs: strategy, lr, weight_decay, warmup_steps, encoder_overrides (see DownstreamTask).
    """

    datamodule_class = SurvivalDataModule
    cli_links = (("data", "model.task_names", lambda data: data.task_names),)

    def __init__(
        self,
        encoder: str | nn.Module,
        task_names: list[str],
        num_bins: int = 8,
        bin_edges_days: list[float] | None = None,
        rank: int = 32,
        horizon_days: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        self.task_names = list(task_names)
        self.num_bins = num_bins
        self.rank = rank
        self.horizon_days = horizon_days
        self.head: PiecewiseExponentialHead | None = None
        if bin_edges_days is not None:
            self._build_head(torch.tensor(bin_edges_days, dtype=torch.float64))
        # Training times/events: the censoring distribution of the integrated Brier score.
        self._train_time = np.zeros((0, len(self.task_names)))
        self._train_event = np.zeros((0, len(self.task_names)), dtype=bool)

    def _build_head(self, edges: torch.Tensor) -> None:
        self.head = PiecewiseExponentialHead(
            self.encoder.embed_dim, len(self.task_names), edges, rank=self.rank
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, SurvivalDataModule):
            if self.head is None:
                raise SurvivalSetupError(
                    "give bin_edges_days, or train with a SurvivalDataModule to fit them"
                )
            return
        train = datamodule.table.filter(pl.col("study_id").is_in(datamodule.study_ids("train")))
        if "has_ehr" in train.columns:
            train = train.filter(pl.col("has_ehr"))
        self._train_time = np.asarray(train["tte_time"].to_list(), dtype=np.float64)
        self._train_event = np.asarray(train["tte_event"].to_list(), dtype=bool)
        if self.head is None:
            events = self._train_time[self._train_event]
            if events.size == 0:
                raise SurvivalSetupError(
                    f"the training split of {datamodule.labels_path} has no observed events"
                )
            self._build_head(fit_bin_edges(events, self.num_bins).to(self.device))
            self.head.to(self.device)
            if stage == "fit":
                self.head.init_task_bias_(
                    torch.from_numpy(self._train_time), torch.from_numpy(self._train_event)
                )
        if self.horizon_days is None:
            self.horizon_days = float(np.median(self._train_time))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The head's shape depends on the fitted bins: rebuild it from the checkpoint's edges.
        edges = checkpoint["state_dict"].get("head.bin_edges_days")
        if edges is not None and (self.head is None or self.head.bin_edges_days.shape != edges.shape):
            self._build_head(edges)
        self.horizon_days = checkpoint.get("fm3d_horizon_days", self.horizon_days)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["fm3d_horizon_days"] = self.horizon_days

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log hazards per day [B, bins, tasks] of a normalised input [B, 1, D, H, W]."""
        return self.head(self.encoder(x).pooled)

    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        log_hazard = self(self.prepare_image(batch["image"]))
        loss = self.head.loss(log_hazard, batch["tte_time"], batch["tte_event"], mask=batch["has_ehr"])
        horizon = torch.tensor([self.horizon_days], dtype=log_hazard.dtype, device=log_hazard.device)
        collect = {
            "log_hazard": log_hazard,
            "risk": self.head.cumulative_hazard(log_hazard, horizon)[:, 0],  # [B, K]
            "time": batch["tte_time"],
            "event": batch["tte_event"],
            "has_ehr": batch["has_ehr"],
        }
        return StepOutput(loss, collect)

    def summarize(self, collected: dict[str, Any], stage: str) -> Evaluation:
        keep = collected["has_ehr"].bool()
        time = collected["time"][keep].double().numpy()
        event = collected["event"][keep].bool().numpy()
        risk = collected["risk"][keep].double().numpy()
        log_hazard = collected["log_hazard"][keep]
        rows = []
        for k, name in enumerate(self.task_names):
            rows.append(
                {
                    "task": name,
                    "c_index": defined_or_nan(lambda k=k: harrell_c(time[:, k], event[:, k], risk[:, k])),
                    "ibs": defined_or_nan(lambda k=k: self._ibs(time[:, k], event[:, k], log_hazard, k)),
                    "events": int(event[:, k].sum()),
                    "n": len(time),
                }
            )
        table = pl.DataFrame(rows)
        metrics = {
            "c_index_mean": finite_mean(table["c_index"].to_numpy()),
            "ibs_mean": finite_mean(table["ibs"].to_numpy()),
            **{f"c_index_{r['task']}": r["c_index"] for r in rows},
        }
        return Evaluation(self.task_name, metrics, {"per_task": table})

    def _ibs(self, time: np.ndarray, event: np.ndarray, log_hazard: torch.Tensor, k: int) -> float:
        times = ibs_times(time)
        if times is None or len(self._train_time) == 0:
            return float("nan")
        probs = self.head.survival(log_hazard, torch.as_tensor(times, dtype=log_hazard.dtype))[:, :, k]
        return integrated_brier_score(
            self._train_time[:, k], self._train_event[:, k], time, event, probs.double().numpy(), times
        )

    def figures(self, collected: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
        from downstream.plots import kaplan_meier_figure

        keep = collected["has_ehr"].bool()
        time, event, risk = (collected[k][keep].double().numpy() for k in ("time", "event", "risk"))
        return {
            f"kaplan_meier_{name}": kaplan_meier_figure(time[:, k], event[:, k] > 0, risk[:, k], title=name)
            for k, name in enumerate(self.task_names)
        }

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Log hazards and the risk at the horizon per study."""
        log_hazard = self(self.prepare_image(batch["image"]))
        horizon = torch.tensor([self.horizon_days], dtype=log_hazard.dtype, device=log_hazard.device)
        risk = self.head.cumulative_hazard(log_hazard, horizon)[:, 0]
        return {"study_id": list(batch["study_id"]), "log_hazard": log_hazard, "risk": risk}
