"""Issue 5 test (a): two-process DDP (gloo, CPU) CLIP equals one process on the concatenated batch.

Also: the epoch-level validation metrics (CLIP retrieval, phenotype AUROC, TTE C-index)
computed on two ranks equal those of one process over all rows.

The objective DDP optimises is the mean over ranks of the per-rank losses (gradients are
averaged), so: the mean of the two ranks' losses equals the single-process loss, every
parameter's (averaged) gradient equals the single-process gradient, and each rank's input
gradient equals world_size times the single-process gradient of its rows (as for any
per-rank mean loss under DDP). Ranks hold unequal row counts and one study has no report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fm3d.text import init_text_model

sys.path.insert(0, str(Path(__file__).parent))  # spawn imports the worker module by name
import clip_ddp_worker

REPORTS = [
    "Liver normal. No focal lesion.",
    "Right lower lobe nodule, 6 mm.",
    "Kidneys unremarkable.",
    "Small ascites.",
    "Emphysema, upper lobes.",
]
ROWS = [(0, 3), (3, 5)]  # rank 0: 3 rows, rank 1: 2 rows


LOSSES = ["infonce", "siglip"]


@pytest.mark.slow
def test_two_process_clip_equals_single_process(tmp_path):
    text_model = str(init_text_model(tmp_path / "text", REPORTS * 2, vocab_size=120, hidden_size=16))
    torch.manual_seed(1)
    inputs = {
        "pooled": torch.randn(5, 8),
        "reports": REPORTS,
        "has_report": torch.tensor([True, True, False, True, True]),
        "phenotype": torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]]),
        "has_ehr": torch.tensor([True, True, True, False, True]),
        "tte_time": torch.tensor([[10.0, 50], [300, 20], [40, 400], [5, 5], [200, 90]]),
        "tte_event": torch.tensor([[True, False], [False, True], [True, True], [True, True], [False, True]]),
    }
    mp.spawn(
        clip_ddp_worker.run,
        args=(2, text_model, LOSSES, inputs, ROWS, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for loss in LOSSES:
        _compare(text_model, loss, inputs, [torch.load(tmp_path / f"{loss}{r}.pt") for r in range(2)])
    # Epoch-level validation metrics gather every rank's rows: both ranks see the whole set.
    single = clip_ddp_worker.validation_metrics(text_model, inputs, 0, 5)
    assert {"i2t_recall_at_1", "auroc", "c_index"} <= {key for metrics in single.values() for key in metrics}
    for rank in range(2):
        distributed = torch.load(tmp_path / f"validation{rank}.pt")
        for name, metrics in single.items():
            assert distributed[name] == pytest.approx(metrics), name


def _compare(text_model: str, loss: str, inputs: dict, ranks: list[dict]) -> None:
    single = clip_ddp_worker.build(text_model, loss)
    pooled = inputs["pooled"].clone().requires_grad_(True)
    value, metrics = clip_ddp_worker.step(single, pooled, REPORTS, inputs["has_report"])
    value.backward()

    for iteration in (0, 1):
        results = [r[iteration] for r in ranks]
        mean_loss = sum(r["loss"] for r in results) / 2
        torch.testing.assert_close(mean_loss, value.detach(), rtol=1e-5, atol=1e-6)
        for rank, (start, stop) in enumerate(ROWS):
            torch.testing.assert_close(
                results[rank]["input_grad"], 2 * pooled.grad[start:stop], rtol=1e-4, atol=1e-7
            )
            assert results[rank]["recall"].item() == pytest.approx(metrics["i2t_recall_at_1"].item())
        for name, param in single.named_parameters():
            if not param.requires_grad:
                continue
            for result in results:  # DDP leaves the same averaged gradient on every rank
                torch.testing.assert_close(
                    result["param_grads"][name], param.grad, rtol=1e-4, atol=1e-7, msg=name
                )
    # The projections do learn from this batch (not a vacuous comparison of zeros).
    assert single.clip.image_projection.weight.grad.abs().sum() > 0
    assert single.clip.text_projection.weight.grad.abs().sum() > 0
