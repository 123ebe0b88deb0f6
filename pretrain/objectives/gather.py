"""Gathering tensors across DDP ranks, with gradients where a contrastive loss needs them.

`torch.distributed.nn.functional.all_gather` is differentiable: its backward sums, over
ranks, the gradient every rank's loss sends to each gathered slice, and hands each rank the
sum for its own slice. With the per-rank loss normalised so that the mean over ranks is the
loss of the whole global batch, DDP's gradient averaging then gives each parameter exactly
the gradient of the single-process loss on the concatenated batch (tested in
tests/pretrain/objectives/test_clip_ddp.py). Ranks may hold different numbers of rows (the
last batch of an epoch): rows are padded to the largest rank's count, gathered, and
unpadded. Without an initialised process group every function returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside a process group."""
    if not distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _rows_per_rank(rows: int, device: torch.device) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(c.item()) for c in counts]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def gather_rows(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's `x` along dim 0, in rank order.

    Returns the gathered tensor and the row offset of this rank's own rows in it (so local
    row i is global row `offset + i`, the target of a contrastive loss). `with_grad=True`
    keeps the result differentiable (each rank's slice routes gradient back to its owner);
    `with_grad=False` is for labels, masks and metrics.
    """
    if not distributed():
        return x, 0
    if x.dtype == torch.bool:  # not every backend (gloo) gathers bool tensors
        gathered, offset = gather_rows(x.to(torch.uint8), with_grad=False)
        return gathered.to(torch.bool), offset
    counts = _rows_per_rank(x.shape[0], x.device)
    rank = dist.get_rank()
    padded = _pad_rows(x, max(counts))
    if with_grad:
        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)], dim=0)
    return gathered, sum(counts[:rank])
