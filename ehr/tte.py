"""MOTOR's piecewise-exponential time-to-event head and its censored log-likelihood loss.

Time is split into B bins by edges `e_0 = 0 < e_1 < ... < e_{B-1} < e_B = +inf` (days). Each
study n and task k gets a constant hazard `lambda[n, b, k]` per bin, so the survival function is
`S(t) = exp(-sum_b lambda_b * r_b(t))` with `r_b(t) = clamp(min(t, e_{b+1}) - e_b, 0)` the time
spent at risk in bin b. The head predicts `log lambda` so the loss stays in log space:
MOTOR (Steinberg et al., 2023; femr's `MOTORTaskHead`) predicts base-2 logits and
exponentiates with `exp2`; fm3d uses natural logarithms throughout, which only rescales the
parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ehr.binning import quantile_bin_edges
from ehr.errors import EHRSettingError

# Time at risk is clamped to this before taking its log, so bins the study never reached give
# exp(log_hazard + log(tiny)) ~ 0 with finite gradients instead of exp(-inf) in backward.
_MIN_TIME_AT_RISK_DAYS = 1e-30


def fit_bin_edges(
    event_times_days: np.ndarray | Sequence[float] | torch.Tensor, num_bins: int
) -> torch.Tensor:
    """Bin edges for the piecewise-exponential head from quantiles of observed event times.

    MOTOR places edges at equally spaced quantiles of the times of observed events (censored
    times excluded), so every bin sees roughly the same number of events. The first edge is 0
    and the last bin is open: the result has `num_bins + 1` entries ending in `+inf`.
    Quantiles that coincide (many events on the same day) are merged, so fewer bins than asked
    may come back; a warning says so. NaN and negative times are ignored.

    Returns:
        float64 tensor [B + 1] of strictly increasing edges `[0, q_1, ..., q_{B-1}, inf]`.
    """
    times = np.asarray(torch.as_tensor(event_times_days, dtype=torch.float64).cpu())
    return torch.tensor(quantile_bin_edges(times, num_bins), dtype=torch.float64)


def _check_edges(bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    edges = torch.as_tensor(bin_edges_days, dtype=torch.float64).flatten()
    if edges.device.type != "cpu":
        # Edges already on an accelerator come from a head that checked them on construction;
        # checking values again would force a device sync every training step.
        return edges
    if edges.numel() < 2 or edges[0] != 0 or not math.isinf(float(edges[-1])):
        raise EHRSettingError(
            "bin edges must start at 0 and end at +inf (B + 1 values, as fit_bin_edges returns), "
            f"got {edges.tolist()}"
        )
    if not bool((edges[1:] > edges[:-1]).all()):
        raise EHRSettingError(f"bin edges must be strictly increasing, got {edges.tolist()}")
    return edges


def time_at_risk(times_days: torch.Tensor, bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Days spent in each bin up to `times_days`: [...] -> [..., B] (0 for bins not reached)."""
    edges = _check_edges(bin_edges_days).to(device=times_days.device, dtype=times_days.dtype)
    start, end = edges[:-1], edges[1:]
    t = times_days.unsqueeze(-1)
    return (torch.minimum(t, end) - start).clamp_min(0)


def event_bin(times_days: torch.Tensor, bin_edges_days: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Index b of the bin with `e_b <= t < e_{b+1}` for each time (int64, same shape)."""
    edges = _check_edges(bin_edges_days).to(device=times_days.device, dtype=times_days.dtype)
    return (torch.searchsorted(edges[1:-1].contiguous(), times_days.contiguous(), right=True)).long()


def piecewise_exponential_nll(
    log_hazard: torch.Tensor,
    time_days: torch.Tensor,
    event: torch.Tensor,
    bin_edges_days: Sequence[float] | torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative piecewise-exponential log-likelihood of censored times, MOTOR's pretraining loss.

    For study n and task k with time t (event or censoring) and event flag d:
    `nll[n, k] = sum_b exp(log_hazard[n, b, k] + log r_b(t)) - d * log_hazard[n, b(t), k]`,
    i.e. cumulative hazard up to t minus the log hazard of the event's bin. Each term is formed
    as `exp(log lambda + log time-at-risk)` so large hazards or long times never overflow first.

    Normalisation: with `reduction="mean"` the sum over bins is divided by the number of
    observed (unmasked) study-task pairs, so the value is an average per-pair NLL and does not
    shrink when the batch contains studies without EHR. (femr averages over [N, B, K] cells
    instead, which only rescales by B.) `reduction="sum"` returns the plain sum, `"none"` the
    [N, K] per-pair NLL (zeros where masked).

    Masked pairs contribute exactly 0 but stay in the autograd graph (their gradient is 0), so
    every parameter of the head receives a gradient on every DDP rank. Their times may be
    anything (NaN included): they are replaced before use.

    Args:
        log_hazard: [N, B, K] natural-log hazards per day.
        time_days: [N, K] time to event or censoring, days (>= 0).
        event: [N, K] bool, True when the time is an observed event.
        bin_edges_days: B + 1 edges starting at 0 and ending at +inf.
        mask: [N] or [N, K] bool, True where the pair is observed; None = all observed.
        reduction: "mean", "sum" or "none".
    """
    if log_hazard.dim() != 3:
        raise EHRSettingError(f"log_hazard must be [N, B, K], got shape {tuple(log_hazard.shape)}")
    n, num_bins, num_tasks = log_hazard.shape
    edges = _check_edges(bin_edges_days)
    if edges.numel() - 1 != num_bins:
        raise EHRSettingError(f"log_hazard has {num_bins} bins but bin_edges_days define {edges.numel() - 1}")
    if time_days.shape != (n, num_tasks) or event.shape != (n, num_tasks):
        raise EHRSettingError(
            f"time_days and event must be [N, K] = {(n, num_tasks)}, got {tuple(time_days.shape)} "
            f"and {tuple(event.shape)}"
        )
    if mask is None:
        mask = torch.ones(n, num_tasks, dtype=torch.bool, device=log_hazard.device)
    elif mask.dim() == 1:
        mask = mask[:, None].expand(n, num_tasks)
    mask = mask.to(dtype=torch.bool, device=log_hazard.device)
    # At least float32: in bf16 a time of 365 days is only resolved to 2 days and exp() overflows
    # early, so a head running under bf16 autocast still gets an accurate loss.
    log_hazard = log_hazard.to(torch.promote_types(log_hazard.dtype, torch.float32))
    event = event.to(dtype=torch.bool, device=log_hazard.device) & mask
    # Sanitise masked times so neither forward nor backward ever sees NaN/inf from them.
    time = torch.where(mask, time_days.to(log_hazard), torch.zeros_like(log_hazard[:, 0]))

    risk = time_at_risk(time, edges).transpose(1, 2)  # [N, B, K]
    log_risk = torch.log(risk.clamp_min(_MIN_TIME_AT_RISK_DAYS))
    cumulative = torch.where(risk > 0, torch.exp(log_hazard + log_risk), torch.zeros_like(log_hazard)).sum(1)

    bins = event_bin(time, edges)  # [N, K]
    log_hazard_at_event = log_hazard.gather(1, bins.unsqueeze(1)).squeeze(1)  # [N, K]
    # Masked pairs have time 0 and no event, so their term is exactly 0 yet still built from
    # log_hazard: the graph (and DDP's view of used parameters) is the same for every batch.
    per_pair = cumulative - torch.where(event, log_hazard_at_event, torch.zeros_like(log_hazard_at_event))

    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.sum() / mask.sum().clamp_min(1)
    raise EHRSettingError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cumulative_hazard(
    log_hazard: torch.Tensor, times_days: torch.Tensor, bin_edges_days: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Cumulative hazard H(t) = sum_b lambda_b r_b(t) at given times.

    Args:
        log_hazard: [N, B, K].
        times_days: [T] (same times for every study) or [N, T].
    Returns:
        [N, T, K].
    """
    times = torch.as_tensor(times_days, dtype=log_hazard.dtype, device=log_hazard.device)
    risk = time_at_risk(times, bin_edges_days)  # [T, B] or [N, T, B]
    if risk.dim() == 2:
        return torch.einsum("tb,nbk->ntk", risk, log_hazard.exp())
    return torch.einsum("ntb,nbk->ntk", risk, log_hazard.exp())


def survival(
    log_hazard: torch.Tensor, times_days: torch.Tensor, bin_edges_days: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Survival probability S(t) = exp(-H(t)) at given times: [N, T, K]."""
    return torch.exp(-cumulative_hazard(log_hazard, times_days, bin_edges_days))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, the normalisation MOTOR applies to each bin's projection."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class PiecewiseExponentialHead(nn.Module):
    """MOTOR's low-rank piecewise-exponential head: one log hazard per (bin, task).

    `logit[n, b, k] = w_k . norm(W_b h_n) + c_k + beta[b, k]`: a shared projection per bin
    (W_b, rank r) followed by RMSNorm and one linear read-out shared across bins. The low rank
    is what lets MOTOR predict thousands of tasks per bin cheaply. `c_k` is the task's log base
    rate (set by `init_task_bias_` from a prefit exponential model, as femr does) so training
    starts at a sensible hazard scale; `beta[b, k]` (zero at start) lets each task deviate per
    bin without going through the features.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        bin_edges_days: Sequence[float] | torch.Tensor,
        rank: int = 64,
    ) -> None:
        super().__init__()
        edges = _check_edges(bin_edges_days)
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.num_bins = edges.numel() - 1
        self.rank = rank
        # float64 buffer: edges in days can be large and must match the labels exactly.
        self.register_buffer("bin_edges_days", edges, persistent=True)
        self.bin_projection = nn.Linear(in_features, self.num_bins * rank)  # W_b for all b at once
        self.norm = RMSNorm(rank)
        self.task_layer = nn.Linear(rank, num_tasks)  # w_k and c_k (its bias)
        self.bin_task_bias = nn.Parameter(torch.zeros(self.num_bins, num_tasks))  # beta[b, k]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Log hazards per day: h [N, in_features] -> [N, B, K]."""
        projected = self.bin_projection(h).view(h.shape[0], self.num_bins, self.rank)  # [N, B, r]
        return self.task_layer(self.norm(projected)) + self.bin_task_bias

    @torch.no_grad()
    def init_task_bias_(
        self, time_days: torch.Tensor, event: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """Set c_k to the log rate of a prefit exponential model: log(events_k / total time at risk_k).

        Tasks without any event get half an event's worth of rate so their bias stays finite.
        """
        time = torch.as_tensor(time_days, dtype=torch.float64)
        event = torch.as_tensor(event, dtype=torch.bool)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            mask = mask[:, None].expand_as(time) if mask.dim() == 1 else mask
            time = torch.where(mask, time, torch.zeros_like(time))
            event = event & mask
        time = torch.nan_to_num(time, nan=0.0).clamp_min(0)
        events = event.sum(0).to(torch.float64).clamp_min(0.5)
        total = time.sum(0).clamp_min(_MIN_TIME_AT_RISK_DAYS)
        self.task_layer.bias.copy_(torch.log(events / total).to(self.task_layer.bias))

    @staticmethod
    def hazards(log_hazard: torch.Tensor) -> torch.Tensor:
        """Hazards per day lambda[n, b, k] from the head's output."""
        return log_hazard.exp()

    def cumulative_hazard(self, log_hazard: torch.Tensor, times_days: torch.Tensor) -> torch.Tensor:
        """H(t) at `times_days` ([T] or [N, T]) for this head's bins: [N, T, K]."""
        return cumulative_hazard(log_hazard, times_days, self.bin_edges_days)

    def survival(self, log_hazard: torch.Tensor, times_days: torch.Tensor) -> torch.Tensor:
        """S(t) = exp(-H(t)) at `times_days` ([T] or [N, T]): [N, T, K]."""
        return survival(log_hazard, times_days, self.bin_edges_days)

    def loss(
        self,
        log_hazard: torch.Tensor,
        time_days: torch.Tensor,
        event: torch.Tensor,
        mask: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """`piecewise_exponential_nll` with this head's bin edges."""
        return piecewise_exponential_nll(log_hazard, time_days, event, self.bin_edges_days, mask, reduction)
