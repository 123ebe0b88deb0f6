"""Worker of test_dino_ddp.py: one DDP rank (gloo, CPU) computing DINO teacher targets on its rows.

A separate module (not a test file) so `torch.multiprocessing.spawn` can import it by name in
the child processes.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

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
    # A file rendezvous in the test's own folder: no TCP port another test could take meanwhile.
    # A short timeout turns a lost peer into an error instead of a 30-minute hang.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out) / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=3),
    )
    try:
        results = {}
        for name, bounds in splits.items():
            start, stop = bounds[rank]  # the same rows of every batch (the rows of one global batch)
            results[name] = targets_and_centres(
                inputs["logits"][start:stop], [batch[start:stop] for batch in inputs["batches"]]
            )
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
