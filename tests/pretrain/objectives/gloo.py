"""The process group of the DDP workers in these tests: gloo on CPU, file rendezvous, short timeout.

A file rendezvous in the test's own folder needs no TCP port another test could take meanwhile;
a short timeout turns a lost peer into an error instead of a 30-minute hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


@contextmanager
def gloo_group(rank: int, world_size: int, folder: str | Path) -> Iterator[None]:
    """Join the group for the block; free every DDP model made inside it before leaving the block.

    A DDP model that outlives `destroy_process_group` holds the last reference to the gloo
    group, and freeing it then joins gloo's threads while holding the GIL one of them waits for.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(folder) / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=3),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
