"""Shards of a job split over SLURM array tasks: which shard a key belongs to, and the `I/N` flag.

A key's shard comes from a hash of the key itself, not from its row position, so a study or
subject stays in its shard when the table it comes from gains or loses rows, and a rerun of one
array task redoes exactly the work it owned.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fm3d.errors import PathError

_NAME = re.compile(r"^(\d{4})-of-(\d{4})$")


class ShardError(PathError):
    """The parts of a split job cannot be merged: one is missing, or they come from two splits."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based); `Shard(0, 1)` is the whole job."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} does not exist: I must be in 0..N-1, N >= 1")

    @property
    def whole(self) -> bool:
        """Whether this is the unsplit job."""
        return self.count == 1

    @property
    def name(self) -> str:
        """A folder or file stem that sorts by index and names the count, e.g. `0003-of-0008`."""
        return f"{self.index:04d}-of-{self.count:04d}"

    def owns(self, key: str) -> bool:
        """Whether `key` (a study id, a subject id as text) belongs to this shard."""
        return shard_of(key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()
"""The unsplit job, the default of every `shard` argument."""


def shard_of(key: str, count: int) -> int:
    """The shard of `key` among `count`: stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def parse_shard(value: str) -> Shard:
    """The argparse type of a `--shard I/N` flag (e.g. `$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`)."""
    index, _, count = value.partition("/")
    try:
        return Shard(int(index), int(count))
    except ValueError as error:
        if not (index.strip().lstrip("-").isdigit() and count.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {value!r}") from None
        raise argparse.ArgumentTypeError(str(error)) from None


def complete_split(folder: Path, suffix: str = "") -> list[tuple[Shard, Path]]:
    """The parts `<i>-of-<n><suffix>` in `folder` by index, once every part of one split is there.

    Raises `ShardError` naming the shards still to run, or the two splits found.
    """
    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _NAME.match(path.name.removesuffix(suffix)) if path.name.endswith(suffix) else None
        if match:
            found[Shard(int(match[1]), int(match[2]))] = path
    if not found:
        raise ShardError(folder, "holds no shards", "run every array task (--shard I/N) first, then merge")
    counts = sorted({shard.count for shard in found})
    if len(counts) > 1:
        raise ShardError(
            folder,
            f"holds shards of splits into {' and '.join(map(str, counts))} parts",
            "remove the shards of the split you abandoned, then merge again",
        )
    missing = [str(Shard(i, counts[0])) for i in range(counts[0]) if Shard(i, counts[0]) not in found]
    if missing:
        raise ShardError(
            folder,
            f"lacks shard(s) {', '.join(missing)}",
            "run those array tasks (--shard I/N), then merge again",
        )
    return sorted(found.items(), key=lambda item: item[0].index)
