"""Piecewise-exponential head and loss against a hand-written loop and autograd gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehr.tte import (
    PiecewiseExponentialHead,
    cumulative_hazard,
    fit_bin_edges,
    piecewise_exponential_nll,
    survival,
)

EDGES = [0.0, 10.0, 30.0, 100.0, math.inf]


def reference_nll(log_hazard, time, event, edges, mask):
    """Per-pair NLL by explicit loops over studies, tasks and bins (plain Python floats)."""
    log_hazard = log_hazard.detach()
    n, b_count, k_count = log_hazard.shape
    total, observed = 0.0, 0
    for n_i in range(n):
        for k in range(k_count):
            if not mask[n_i][k]:
                continue
            observed += 1
            t = float(time[n_i, k])
            for b in range(b_count):
                start, end = edges[b], edges[b + 1]
                at_risk = max(0.0, min(t, end) - start)
                total += math.exp(float(log_hazard[n_i, b, k])) * at_risk
                if event[n_i, k] and start <= t < end:
                    total -= float(log_hazard[n_i, b, k])
    return total / observed


def small_case(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    log_hazard = torch.randn(5, 4, 3, generator=gen, dtype=dtype) - 3
    time = torch.tensor(
        [[5.0, 10.0, 150.0], [0.0, 30.0, 99.9], [250.0, 1.0, 10.0], [45.0, 45.0, 45.0], [7.0, 300.0, 31.0]],
        dtype=dtype,
    )
    event = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return log_hazard, time, event


def test_nll_equals_reference_loop():
    log_hazard, time, event = small_case()
    mask = torch.ones_like(event)
    got = piecewise_exponential_nll(log_hazard, time, event, EDGES)
    assert got.item() == pytest.approx(
        reference_nll(log_hazard, time, event, EDGES, mask.tolist()), rel=1e-12
    )


def test_masked_pairs_contribute_zero_and_keep_gradients():
    log_hazard, time, event = small_case()
    log_hazard.requires_grad_(True)
    row_mask = torch.tensor([True, False, True, False, True])
    time = time.clone()
    time[1] = float("nan")  # a study without EHR: its labels are garbage and must not matter
    loss = piecewise_exponential_nll(log_hazard, time, event, EDGES, mask=row_mask)
    pair_mask = row_mask[:, None].expand(-1, 3).tolist()
    assert loss.item() == pytest.approx(reference_nll(log_hazard, time, event, EDGES, pair_mask), rel=1e-12)
    loss.backward()
    assert torch.isfinite(log_hazard.grad).all()
    assert (log_hazard.grad[1] == 0).all() and (log_hazard.grad[3] == 0).all()
    per_pair = piecewise_exponential_nll(log_hazard, time, event, EDGES, mask=row_mask, reduction="none")
    assert (per_pair[~row_mask] == 0).all()


def test_all_masked_is_zero_with_graph():
    log_hazard, time, event = small_case()
    log_hazard.requires_grad_(True)
    loss = piecewise_exponential_nll(log_hazard, time, event, EDGES, mask=torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert log_hazard.grad is not None and (log_hazard.grad == 0).all()


def test_gradcheck_double():
    log_hazard, time, event = small_case()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    log_hazard.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lh: piecewise_exponential_nll(lh, time, event, EDGES, mask=mask), (log_hazard,)
    )


def test_constant_hazard_matches_exponential_model():
    # With one bin the model is exponential: NLL = lambda * t - d * log(lambda), minimised at
    # lambda = events / total time, which is what init_task_bias_ sets.
    time = torch.tensor([[2.0], [5.0], [3.0], [10.0]], dtype=torch.float64)
    event = torch.tensor([[True], [False], [True], [True]])
    rate = 3 / 20
    head = PiecewiseExponentialHead(4, 1, [0.0, math.inf], rank=2).double()
    head.init_task_bias_(time, event)
    assert head.task_layer.bias.item() == pytest.approx(math.log(rate))
    log_hazard = torch.full((4, 1, 1), math.log(rate), dtype=torch.float64)
    expected = (rate * 20 - 3 * math.log(rate)) / 4
    assert piecewise_exponential_nll(log_hazard, time, event, [0.0, math.inf]).item() == pytest.approx(
        expected
    )


def test_cumulative_hazard_and_survival():
    log_hazard = torch.log(torch.tensor([[[0.1], [0.2], [0.3], [0.4]]], dtype=torch.float64))  # [1, 4, 1]
    times = torch.tensor([0.0, 5.0, 20.0, 200.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5, 1.0 + 0.2 * 10, 1.0 + 4.0 + 0.3 * 70 + 0.4 * 100], dtype=torch.float64)
    got = cumulative_hazard(log_hazard, times, EDGES)
    assert got.shape == (1, 4, 1)
    torch.testing.assert_close(got[0, :, 0], expected)
    torch.testing.assert_close(survival(log_hazard, times, EDGES)[0, :, 0], torch.exp(-expected))
    per_study = cumulative_hazard(log_hazard, times[None], EDGES)
    torch.testing.assert_close(per_study, got)


def test_head_shapes_formula_and_training_step():
    torch.manual_seed(0)
    head = PiecewiseExponentialHead(16, 3, EDGES, rank=8)
    h = torch.randn(6, 16)
    out = head(h)
    assert out.shape == (6, 4, 3)
    # logit[n,b,k] = w_k . norm(W_b h_n) + c_k + beta[b,k], written out independently
    w_b = head.bin_projection.weight.view(4, 8, 16)
    bias_b = head.bin_projection.bias.view(4, 8)
    proj = torch.einsum("brf,nf->nbr", w_b, h) + bias_b
    normed = proj / torch.sqrt(proj.pow(2).mean(-1, keepdim=True) + 1e-6) * head.norm.weight
    manual = normed @ head.task_layer.weight.T + head.task_layer.bias + head.bin_task_bias
    torch.testing.assert_close(out, manual)

    time = torch.rand(6, 3) * 200
    event = torch.rand(6, 3) > 0.5
    loss = head.loss(out, time, event, mask=torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool))
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert head.survival(out, torch.tensor([1.0, 50.0])).shape == (6, 2, 3)
    torch.testing.assert_close(head.hazards(out), out.exp())


def test_fit_bin_edges_quantiles():
    times = np.arange(1, 101, dtype=float)  # 1..100
    edges = fit_bin_edges(times, 4)
    expected = [0.0, *np.quantile(times, [0.25, 0.5, 0.75]).tolist(), math.inf]
    assert edges.tolist() == pytest.approx(expected)
    # ties collapse to fewer bins rather than zero-width ones
    tied = fit_bin_edges(np.array([5.0] * 50 + [9.0]), 4)
    assert tied.tolist() == [0.0, 5.0, math.inf]
    with pytest.raises(ValueError, match="at least one observed event"):
        fit_bin_edges(np.array([np.nan]), 4)


def test_bad_edges_rejected():
    with pytest.raises(ValueError, match="start at 0 and end at \\+inf"):
        PiecewiseExponentialHead(4, 2, [0.0, 10.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseExponentialHead(4, 2, [0.0, 10.0, 10.0, math.inf])


def test_low_precision_input_is_computed_in_float32():
    log_hazard, time, event = small_case(torch.float32)
    reference = piecewise_exponential_nll(log_hazard.bfloat16().float(), time, event, EDGES)
    low = log_hazard.bfloat16().requires_grad_(True)
    loss = piecewise_exponential_nll(low, time, event, EDGES)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()
