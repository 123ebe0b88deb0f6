"""Worker of test_dino.py's DDP test: one gloo rank taking SGD steps with the DINO objective.

A separate module (not a test file) so `torch.multiprocessing.spawn` can import it by name.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fm3d
from pretrain.objectives.dino import DINOObjective

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


def run(rank: int, world_size: int, centering: str, batch: dict, out: str) -> None:
    """Rank `rank` trains on its half of `batch` under DDP and saves the objective's state."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out) / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=3),
    )
    try:
        rows = batch["global_crops"].shape[0] // world_size
        half = {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}
        student = Student(centering)
        torch.save(train(DistributedDataParallel(student), student, half), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
