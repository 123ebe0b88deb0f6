"""pretrain.objectives.tte: NLL by hand, masks, gradients, validation C-index vs scikit-survival."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sksurv.metrics import concordance_index_censored

from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.tte import TimeToEventObjective, doubling_bin_edges


def _encoded(pooled: torch.Tensor) -> dict[str, EncoderOutput]:
    return {"image": EncoderOutput(tokens=pooled[:, None], pooled=pooled, grid=(1, 1, 1))}


def _constant_hazard(objective: TimeToEventObjective, log_rates: list[float]) -> None:
    """Make the head predict the same hazard in every bin: log_rates[k] per day for task k."""
    with torch.no_grad():
        for p in objective.head.parameters():
            p.zero_()
        objective.head.task_layer.bias.copy_(torch.tensor(log_rates))


def test_nll_by_hand_for_constant_hazards():
    objective = TimeToEventObjective(4, 2, bin_edges_days=[10.0, 100.0], rank=2)
    _constant_hazard(objective, [math.log(0.01), math.log(0.002)])
    batch = {
        "tte_time": torch.tensor([[50.0, 200.0], [5.0, float("nan")], [30.0, 30.0]]),
        "tte_event": torch.tensor([[True, False], [False, False], [True, True]]),
        "has_ehr": torch.tensor([True, True, False]),
    }
    loss, metrics = objective(batch, _encoded(torch.randn(3, 4)))
    # Exponential NLL per observed pair: rate * t - event * log(rate).
    pairs = [0.01 * 50 - math.log(0.01), 0.002 * 200, 0.01 * 5]
    assert loss.item() == pytest.approx(sum(pairs) / 3, rel=1e-5)
    assert metrics["event_rate"].item() == pytest.approx(1 / 3)


def test_edges_accept_yaml_forms_and_default_doubling():
    assert doubling_bin_edges(4, 400.0) == [0.0, 100.0, 200.0, 400.0, math.inf]
    objective = TimeToEventObjective(4, 1, bin_edges_days=[0.0, 30.0, math.inf])
    assert objective.head.bin_edges_days.tolist() == [0.0, 30.0, math.inf]
    assert objective.horizon_days == 30.0
    assert TimeToEventObjective(4, 1, num_bins=3, max_time_days=365.0).head.num_bins == 3
    with pytest.raises(ObjectiveError, match="bin edges"):
        TimeToEventObjective(4, 1, bin_edges_days=[30.0, 10.0])


def test_initial_hazard_is_one_event_per_horizon_or_the_label_rate():
    objective = TimeToEventObjective(4, 2, bin_edges_days=[100.0, 400.0], rank=2)
    assert objective.head.task_layer.bias.tolist() == pytest.approx([-math.log(400.0)] * 2)
    time = torch.tensor([[100.0, 50.0], [300.0, 150.0]])
    event = torch.tensor([[True, False], [True, False]])
    objective.init_from_labels(time, event)
    # Task 0: 2 events in 400 days; task 1: no event, counted as half an event in 200 days.
    assert objective.head.task_layer.bias.tolist() == pytest.approx([math.log(2 / 400), math.log(0.5 / 200)])


def test_every_parameter_gets_a_gradient_without_ehr():
    objective = TimeToEventObjective(4, 2, num_bins=3, rank=2)
    pooled = torch.randn(2, 4, requires_grad=True)
    batch = {
        "tte_time": torch.full((2, 2), float("nan")),
        "tte_event": torch.zeros(2, 2, dtype=torch.bool),
        "has_ehr": torch.zeros(2, dtype=torch.bool),
    }
    loss, _ = objective(batch, _encoded(pooled))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in objective.parameters())
    assert torch.isfinite(pooled.grad).all()


def test_validation_c_index_matches_sksurv():
    rng = np.random.default_rng(0)
    n = 30
    torch.manual_seed(0)
    objective = TimeToEventObjective(3, 2, num_bins=4, max_time_days=400.0, rank=2).eval()
    objective.reset_validation()
    times, events, risks, keeps = [], [], [], []
    for _ in range(3):
        pooled = torch.randn(n // 3, 3)
        time = torch.tensor(rng.uniform(1, 500, size=(n // 3, 2)), dtype=torch.float32)
        event = torch.tensor(rng.random((n // 3, 2)) < 0.5)
        event[:, 1] = False  # task 1 has no events: left out of the mean
        has_ehr = torch.tensor(rng.random(n // 3) < 0.8)
        batch = {"tte_time": time, "tte_event": event, "has_ehr": has_ehr}
        objective.update_validation(batch, _encoded(pooled))
        log_hazard = objective.head(pooled)
        risks.append(objective.head.cumulative_hazard(log_hazard, torch.tensor([400.0]))[:, 0].detach())
        times.append(time), events.append(event), keeps.append(has_ehr)
    metrics = objective.compute_validation()
    keep = torch.cat(keeps).numpy()
    time, event, risk = (torch.cat(x)[keep, 0].numpy() for x in (times, events, risks))
    expected = concordance_index_censored(event, time, risk)[0]
    assert metrics == {"c_index": pytest.approx(expected)}


def test_width_mismatch_is_a_clear_error():
    objective = TimeToEventObjective(4, 3)
    batch = {"tte_time": torch.zeros(2, 2), "tte_event": torch.zeros(2, 2, dtype=torch.bool)}
    with pytest.raises(ObjectiveError, match="num_tasks"):
        objective(batch, _encoded(torch.randn(2, 4)))
