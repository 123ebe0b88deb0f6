"""Worker of test_clip_ddp.py: one DDP rank (gloo, CPU) running the objectives on its rows.

A separate module (not a test file) so `torch.multiprocessing.spawn` can import it by name in
the child processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gloo import gloo_group  # this folder: spawn imports the workers by name
from torch.nn.parallel import DistributedDataParallel

from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.clip import ClipObjective
from pretrain.objectives.phenotype import PhenotypeObjective
from pretrain.objectives.tte import TimeToEventObjective


def build(text_model: str, loss: str) -> ClipObjective:
    """The same objective in every process: seeded heads, eval mode (no text dropout)."""
    torch.manual_seed(0)
    return ClipObjective(8, text_model, proj_dim=4, max_length=32, loss=loss).eval()


def step(objective: torch.nn.Module, pooled: torch.Tensor, reports: list[str], has_report: torch.Tensor):
    """Loss and metrics for rows `pooled` as the encoder would hand them over."""
    encoded = {"image": EncoderOutput(tokens=pooled[:, None], pooled=pooled, grid=(1, 1, 1))}
    return objective({"report": reports, "has_report": has_report}, encoded)


def validation_metrics(text_model: str, inputs: dict, start: int, stop: int) -> dict[str, dict[str, float]]:
    """Epoch-level validation metrics of seeded CLIP, phenotype and TTE objectives on rows start:stop."""
    batch = {key: value[start:stop] for key, value in inputs.items()}
    pooled = batch["pooled"]
    encoded = {"image": EncoderOutput(tokens=pooled[:, None], pooled=pooled, grid=(1, 1, 1))}
    batch["report"] = batch.pop("reports")
    results = {}
    for name, make in (
        ("clip", lambda: ClipObjective(8, text_model, proj_dim=4, max_length=32)),
        ("phenotype", lambda: PhenotypeObjective(8, 3)),
        ("tte", lambda: TimeToEventObjective(8, 2, num_bins=3, rank=2)),
    ):
        torch.manual_seed(0)
        objective = make().eval()
        objective.reset_validation()
        objective.update_validation(batch, encoded)
        results[name] = objective.compute_validation()
    return results


def run(rank: int, world_size: int, text_model: str, losses: list, inputs: dict, rows: list, out: str):
    """Rank `rank` takes rows[rank] of the global batch, runs two DDP steps per loss, saves results."""
    with gloo_group(rank, world_size, out):
        start, stop = rows[rank]
        for loss in losses:
            # A temporary, freed while the group lives (see gloo.gloo_group).
            _two_steps(
                DistributedDataParallel(build(text_model, loss)),
                inputs,
                start,
                stop,
                Path(out) / f"{loss}{rank}.pt",
            )
        torch.save(validation_metrics(text_model, inputs, start, stop), Path(out) / f"validation{rank}.pt")


def _two_steps(model: DistributedDataParallel, inputs: dict, start: int, stop: int, path: Path) -> None:
    """Two steps (a second one fails if DDP missed a parameter's gradient); results to `path`."""
    results = {}
    for iteration in range(2):  # a second step fails if DDP missed a parameter's gradient
        model.zero_grad()
        pooled = inputs["pooled"][start:stop].clone().requires_grad_(True)
        reports = inputs["reports"][start:stop]
        value, metrics = step(model, pooled, reports, inputs["has_report"][start:stop])
        value.backward()
        results[iteration] = {
            "loss": value.detach(),
            "recall": metrics["i2t_recall_at_1"],
            "input_grad": pooled.grad.detach(),
            "param_grads": {
                n: p.grad.detach().clone() for n, p in model.module.named_parameters() if p.requires_grad
            },
        }
    torch.save(results, path)
