"""Training batches streamed from a pack: each rank and worker reads its own shards, and resumes mid-epoch.

    pack = PackedCache("s3://bucket/ct-pack")          # or a local path, or memory:// in tests
    samples = CTDataset(pack, spec=spec, train=True)     # the memmap path's dataset, over the pack
    loader = StreamingLoader(ShardStream(samples, batch_size=8), num_workers=4)

`ShardStream` yields whole batches made by the dataset the memmap path uses (`CTDataset` over a
`fm3d.data.streaming.PackedCache`), so a study's sample in epoch e is the memmap path's sample of
index `e * len(dataset) + position`: the same views, crops and random draws, bit for bit.

Which studies a worker reads, each epoch (`plan_epoch`):
1. the shards are shuffled by (seed, epoch), then ordered largest first (a stable sort, so the
   shuffle only reorders shards of one size); shard j goes to slot j mod (ranks x workers), slot
   s to rank s mod ranks and worker s // ranks. Every shard is read by one worker of one rank,
   and since a slot's shard sizes do not depend on the shuffle, neither does the epoch's length;
2. a worker reads its shards one after another, each in an order shuffled by (seed, epoch, shard)
   (ranged reads: `pack.parquet` says where each study is), cut into batches; a worker's last
   batch may be short;
3. every rank must step as often as the others (DDP): a rank with fewer batches than the longest
   repeats studies from the start of its workers' streams, as `DistributedSampler` pads.
Without shuffling (evaluation) the shards and studies keep the pack's order.

Resuming: a DataLoader hands out its workers' batches round-robin (skipping a worker that is
done), so the k batches one rank consumed fix how many each worker made and whose turn comes
next. `StreamingLoader.state_dict()` is `{epoch, batches}` (plus the layout it was taken with);
after `load_state_dict` the next iterator skips each worker's consumed batches without reading
them and starts the round-robin at the right worker: batch k + 1 of the uninterrupted epoch comes
next. Lightning's fit loop saves and restores that state with its checkpoints (it treats any
loader with `state_dict`/`load_state_dict` as resumable). A state taken with another number of
ranks, workers or batch size cannot continue the same stream: the epoch then restarts (a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm3d.data.collate import collate_samples
from fm3d.data.datasets import CTDataset
from fm3d.data.streaming import PackedCache, PackError
from fm3d.errors import Fm3dError

logger = logging.getLogger(__name__)

Batches = list[list[int]]  # batches of study positions


class StreamLayoutError(Fm3dError, ValueError):
    """More readers (ranks x workers) than shards with studies: some reader would have none."""


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's batches: `batches[rank][worker]` lists that worker's batches of study positions.

    `length` is every rank's batch count (padded to the longest rank); `shards[rank][worker]`
    the shards that worker reads.
    """

    batches: list[list[Batches]]
    shards: list[list[list[int]]]
    length: int


def plan_epoch(
    shards: Sequence[Sequence[int]],
    epoch: int,
    seed: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    shuffle: bool,
) -> EpochPlan:
    """Deal the shards' studies (positions, one list per shard) to ranks and workers (module docstring)."""
    nonempty = [s for s in range(len(shards)) if shards[s]]
    readers = world_size * num_workers
    if len(nonempty) < readers:
        raise StreamLayoutError(
            f"{len(nonempty)} shards hold studies to read, fewer than the {world_size} ranks x {num_workers} "
            f"workers that each need one: pack into at least {readers} shards (`fm3d stream pack --shards`) "
            "or use fewer DataLoader workers"
        )
    order = list(np.random.default_rng([seed, epoch]).permutation(nonempty)) if shuffle else nonempty
    order.sort(key=lambda s: -len(shards[s]))  # stable: the shuffle survives among equal sizes
    dealt: list[list[list[int]]] = [[[] for _ in range(num_workers)] for _ in range(world_size)]
    for j, shard in enumerate(order):
        slot = j % readers
        dealt[slot % world_size][slot // world_size].append(int(shard))
    streams = [[_stream(shards, worker, epoch, seed, shuffle) for worker in rank] for rank in dealt]
    batches = [[_cut(stream, batch_size) for stream in rank] for rank in streams]
    length = max(sum(len(b) for b in rank) for rank in batches)
    for rank, rank_streams in zip(batches, streams, strict=True):
        _pad(rank, rank_streams, length, batch_size)
    return EpochPlan(batches, dealt, length)


def _stream(
    shards: Sequence[Sequence[int]], mine: list[int], epoch: int, seed: int, shuffle: bool
) -> list[int]:
    """A worker's studies in reading order: its shards in turn, each shuffled by (seed, epoch, shard)."""
    stream: list[int] = []
    for shard in mine:
        order = (
            np.random.default_rng([seed, epoch, shard]).permutation(len(shards[shard])) if shuffle else None
        )
        stream += list(shards[shard]) if order is None else [shards[shard][i] for i in order]
    return stream


def _cut(stream: list[int], batch_size: int) -> Batches:
    return [stream[i : i + batch_size] for i in range(0, len(stream), batch_size)]


def _pad(rank: list[Batches], streams: list[list[int]], length: int, batch_size: int) -> None:
    """Append batches repeated from the workers' stream starts until the rank has `length` batches.

    Each extra batch goes to the worker with the fewest batches (the lowest-numbered on a tie), so
    the round-robin hand-out stays even.
    """
    taken = [0] * len(rank)  # studies each worker has repeated so far
    while sum(len(b) for b in rank) < length:
        worker = min(range(len(rank)), key=lambda w: (len(rank[w]), w))
        stream = streams[worker]
        rank[worker].append([stream[(taken[worker] + i) % len(stream)] for i in range(batch_size)])
        taken[worker] += batch_size


def resume_point(counts: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """After `consumed` batches of a round-robin over workers with `counts` batches: each worker's
    consumed batches, and the worker whose turn is next (the DataLoader's in-order hand-out)."""
    taken = [0] * len(counts)
    turn, given = 0, 0
    while given < consumed:
        if taken[turn] < counts[turn]:
            taken[turn] += 1
            given += 1
        turn = (turn + 1) % len(counts)
    return taken, turn


class ShardStream(IterableDataset):
    """The batches one rank reads from a pack in one epoch (module docstring): an iterable of batch dicts.

    Args:
        samples: the dataset that cuts each sample, over a `PackedCache` (`CTDataset(pack, ...)`);
            it says whether the stream trains (`samples.train`: shuffled, seeded by epoch).
        batch_size: samples per batch (a worker's last batch of the epoch may be shorter).
        seed: the shuffle's seed (default: the dataset's).

    `StreamingLoader` sets the epoch, rank and resume point before each epoch (`configure`).
    """

    def __init__(self, samples: CTDataset, batch_size: int, seed: int | None = None) -> None:
        if not isinstance(samples.cache, PackedCache):
            raise PackError(
                samples.cache.root,
                "is a prepared cache, not a pack: ShardStream reads shards",
                "pack it with `fm3d stream pack`, or read it with the memmap loaders (fm3d.data.datamodule)",
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.samples, self.batch_size = samples, batch_size
        self.seed = samples.seed if seed is None else seed
        positions = {study_id: i for i, study_id in enumerate(samples.study_ids)}
        pack = samples.cache
        # Each shard's studies as positions in the dataset (a split reads only its own studies).
        self.shards: list[list[int]] = [
            [positions[pack.study_ids[p]] for p in shard if pack.study_ids[p] in positions]
            for shard in pack.shard_positions()
        ]
        self.epoch, self.rank, self.world_size, self.consumed = 0, 0, 1, 0

    def configure(self, epoch: int, rank: int = 0, world_size: int = 1, consumed: int = 0) -> None:
        """Read epoch `epoch` as rank `rank` of `world_size`, skipping the first `consumed` batches."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} does not exist among {world_size} ranks")
        self.epoch, self.rank, self.world_size, self.consumed = epoch, rank, world_size, consumed

    def plan(self, num_workers: int, world_size: int | None = None) -> EpochPlan:
        """The configured epoch's plan for `num_workers` workers per rank (1 without workers)."""
        world_size = self.world_size if world_size is None else world_size
        return plan_epoch(
            self.shards, self.epoch, self.seed, world_size, num_workers, self.batch_size, self.samples.train
        )

    def length(self, num_workers: int, world_size: int) -> int:
        """Batches per rank in an epoch of `world_size` ranks (the same every epoch)."""
        return self.plan(num_workers, world_size).length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.plan(workers).batches[self.rank]
        taken, turn = resume_point([len(b) for b in mine], self.consumed)
        # Resumed, the DataLoader starts its round-robin at worker 0: worker i plays the part of
        # the worker whose turn was i-th from the resume point.
        role = (turn + worker) % workers
        offset = self.epoch * len(self.samples) if self.samples.train else 0
        for batch in mine[role][taken[role] :]:
            yield self.samples.__getitems__([offset + position for position in batch])


class StreamingLoader(DataLoader):
    """A DataLoader over a `ShardStream` that counts epochs and batches, and resumes mid-epoch.

    Each new iterator reads the next epoch (the first reads epoch 0, or `set_epoch`'s), as this
    process's rank of `torch.distributed` unless `rank` and `world_size` are given. Workers are
    started afresh every epoch (never persistent): the epoch and resume point reach a worker in
    its copy of the stream, made when the epoch's iterator starts.

    Args:
        stream: the batches to read.
        num_workers: worker processes per rank (0: read in this process).
        rank, world_size: this reader's place among the ranks (default: torch.distributed's, or 0 of 1).
        pin_memory: page-locked batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
        **kwargs: Any,
    ) -> None:
        # batch_size=None: the stream yields whole batches (written straight into shared memory).
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, collate_fn=collate_samples,
            pin_memory=pin_memory, persistent_workers=False, **kwargs,
        )  # fmt: skip
        self._place = (rank, world_size)
        self.epoch, self.batches = 0, 0
        self._started = False
        self._resume: dict[str, int] | None = None

    def ranks(self) -> tuple[int, int]:
        """(rank, world size) this loader reads as."""
        rank, world_size = self._place
        if rank is not None and world_size is not None:
            return rank, world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return self.dataset.length(max(1, self.num_workers), self.ranks()[1])

    def set_epoch(self, epoch: int) -> None:
        """Read `epoch` with the next iterator (from its start)."""
        self.epoch, self.batches, self._started, self._resume = epoch, 0, False, None

    def state_dict(self) -> dict[str, int]:
        """Where this rank is: the epoch and the batches consumed in it, and the layout they count in."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "world_size": self.ranks()[1],
            "num_workers": self.num_workers,
            "batch_size": self.dataset.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state` (`state_dict()` of a loader over the same pack): the next iterator
        yields the batch after the last one consumed."""
        self._resume = dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumed = self._start_epoch()
        self.dataset.configure(self.epoch, *self.ranks(), consumed=consumed)
        self.batches = consumed
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def _start_epoch(self) -> int:
        """Set the epoch the new iterator reads; returns the batches of it already consumed."""
        resume, self._resume = self._resume, None
        if resume is None:
            if self._started:
                self.epoch += 1
            self._started = True
            return 0
        self._started = True
        self.epoch = int(resume["epoch"])
        layout = {"world_size": self.ranks()[1], "num_workers": self.num_workers,
                  "batch_size": self.dataset.batch_size}  # fmt: skip
        saved = {key: resume.get(key) for key in layout}
        if saved != layout:
            logger.warning(
                "the loader state was taken with %s, this loader reads with %s: epoch %d restarts from its "
                "first batch", saved, layout, self.epoch,
            )  # fmt: skip
            return 0
        if int(resume["batches"]) >= len(self):
            self.epoch += 1  # taken at the end of an epoch: the next one starts
            return 0
        return int(resume["batches"])
