"""Workers of test_dino_ddp.py: one DDP rank (gloo, CPU) computing DINO teacher targets on its rows,
or taking SGD steps with the whole DINO objective on its half of a batch.

A separate module (not a test file) so `torch.multiprocessing.spawn` can import it by name in
the child processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gloo import gloo_group  # this folder: spawn imports the workers by name
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fm3d
from pretrain.objectives.dino import DINOObjective
from pretrain.objectives.dino_losses import TeacherCenter, sinkhorn_knopp_teacher

TEACHER_TEMP = 0.07
MOMENTUM = 0.9


def targets_and_centres(logits: torch.Tensor, batches: list[torch.Tensor]) -> dict[str, object]:
    """Sinkhorn-Knopp targets of `logits`, and the centre after updating with each of `batches`."""
    center = TeacherCenter(logits.shape[1], momentum=MOMENTUM)
    centres = []
    for batch in batches:
        center.update(batch)
        centres.append(center.center.clone())
    return {"sinkhorn": sinkhorn_knopp_teacher(logits, TEACHER_TEMP), "centres": centres}


def run(rank: int, world_size: int, inputs: dict, splits: dict, out: str) -> None:
    """For every split, rank `rank` takes its rows of each batch and saves its targets and centres."""
    with gloo_group(rank, world_size, out):
        results = {}
        for name, bounds in splits.items():
            start, stop = bounds[rank]  # the same rows of every batch (the rows of one global batch)
            results[name] = targets_and_centres(
                inputs["logits"][start:stop], [batch[start:stop] for batch in inputs["batches"]]
            )
        torch.save(results, Path(out) / f"rank{rank}.pt")


TINY = {"image_size": [16, 16, 16], "patch_size": [8, 8, 8], "depth": 2}
STEPS = 2


class Student(nn.Module):
    """Encoder + objective as the PretrainModule holds them (DDP wraps the pair)."""

    def __init__(self, centering: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = fm3d.create_encoder("vit3d_tiny", **TINY)
        # KoLeo is off: it compares the rows of one rank (as in DINOv2), so it is not a joined-batch term.
        self.objective = DINOObjective(
            self.encoder.embed_dim, prototypes=32, head_hidden_dim=16, bottleneck_dim=8,
            koleo_weight=0.0, centering=centering,
        )  # fmt: skip
        self.objective.bind(self.encoder)

    def forward(self, batch: dict) -> torch.Tensor:
        loss, _ = self.objective(batch, self.objective.encode(self.encoder, batch))
        return loss


def train(model: nn.Module, student: Student, batch: dict) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps on `batch`, each followed by the teacher's EMA update; the end state."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    losses = []
    for step in range(STEPS):
        student.objective.on_train_batch_start(step, STEPS)
        optimizer.zero_grad()
        loss = model(batch)
        loss.backward()
        optimizer.step()
        student.objective.on_train_batch_end()
        losses.append(loss.detach())
    state = {f"state.{k}": v.clone() for k, v in student.objective.state_dict().items()}
    return {"losses": torch.stack(losses), **state}


def run_objective(rank: int, world_size: int, centering: str, batch: dict, out: str) -> None:
    """Rank `rank` trains on its half of `batch` under DDP and saves the objective's state."""
    with gloo_group(rank, world_size, out):
        rows = batch["global_crops"].shape[0] // world_size
        half = {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}
        student = Student(centering)
        # The DDP wrapper is a temporary, freed while the group lives (see gloo.gloo_group).
        torch.save(train(DistributedDataParallel(student), student, half), Path(out) / f"rank{rank}.pt")
