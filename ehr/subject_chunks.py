"""Split the subjects to label into chunks of bounded size, so label building runs in flat memory.

A study's labels depend only on its own subject's events, so subjects can be labelled a chunk
at a time: peak memory then follows the largest chunk, not the dataset. A census (one streaming
pass over `subject_id` and `time`, cheap: MEDS stores subject ids sorted, they compress to
almost nothing) counts each subject's timed events and finds its last one; the subjects are then
cut, file by file and in id order, into chunks of about `budget_rows` rows, where a subject
weighs its events plus its studies' (study x task/group) grid rows, the two things a chunk
holds in memory.

A chunk is a run of consecutive subject ids of one file, and MEDS files keep a subject's events
contiguous and sorted by subject, so a chunk's scan reads only that file and, through the
parquet statistics of `subject_id`, only the row groups holding its id range: every event is
decoded about once however many chunks there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehr.meds import MEDSDataset

# What one row of a chunk costs at the chunk's peak, in the worst case: measured on the MIMIC-IV
# demo x11 with every event kept (a phenotype prefix matching every code, or 2,000 tasks), a
# chunk's peak grows by 76-106 bytes per row; with the 64 most informative tasks, by about 4.
# Rounded up, it turns a MiB budget into rows the budget holds whatever the codes are.
BYTES_PER_ROW = 128
# 64 MiB = 524k rows a chunk, about 20 chunks per 10M events: on the demo x11 to x176 the
# throughput stays that of the per-file scan it replaced (10-11 M events/s against 8-13), and
# a chunk holds 2-4 MiB there (64 MiB only if every event were a task or phenotype event).
DEFAULT_MEMORY_BUDGET_MIB = 64.0


@dataclass(frozen=True)
class SubjectChunk:
    """Subjects labelled together: their ids (sorted), the files holding their events, and their weight."""

    subjects: pl.Series
    files: tuple[Path, ...]
    rows: int

    def events(self, dataset: MEDSDataset, columns: Sequence[str]) -> pl.LazyFrame:
        """The chunk's timed events: its files only, the id range first so parquet statistics prune."""
        ids = self.subjects
        return dataset.events(columns=columns, files=self.files).filter(
            pl.col("subject_id").is_between(ids[0], ids[-1])
            & pl.col("subject_id").is_in(ids.implode())
            & pl.col("time").is_not_null()
        )


def budget_rows(memory_budget_mib: float) -> int:
    """How many rows (events + grid rows) one chunk may hold for a memory budget in MiB."""
    return max(1, int(memory_budget_mib * 2**20 / BYTES_PER_ROW))


def subject_census(dataset: MEDSDataset, subject_ids: pl.Series) -> pl.DataFrame:
    """Per (file, subject) among `subject_ids`: the number of timed events and the last event time.

    One streaming pass per file over two columns; the result has a row per subject and file
    (a subject is normally in one file, but nothing here relies on it).
    """
    wanted = subject_ids.implode()
    parts = []
    for index, path in enumerate(dataset.files):
        parts.append(
            dataset.events(columns=("subject_id", "time"), files=[path])
            .filter(pl.col("time").is_not_null() & pl.col("subject_id").is_in(wanted))
            .group_by("subject_id")
            .agg(events=pl.len(), last_time=pl.col("time").max())
            .with_columns(file=pl.lit(index, pl.UInt32))
            .collect(engine="streaming")
        )
    return pl.concat(parts)


def plan_subject_chunks(
    census: pl.DataFrame, studies_per_subject: pl.DataFrame, width: int, rows: int, files: Sequence[Path]
) -> list[SubjectChunk]:
    """Cut the subjects of `studies_per_subject` (subject_id, studies) into chunks of <= `rows` rows.

    A subject weighs its timed events (from `census`, `subject_census`'s table, which must hold
    every one of these subjects; its `file` indexes `files`) plus studies x `width` grid rows.
    It is never split, so a subject heavier than `rows` is a chunk of its own. Chunks never
    straddle files: a subject belongs to the first file holding it, and each file's subjects
    are cut in id order. Shards written by MEDS tools interleave subject ids across files, so a
    chunk taking the tail of one file and the head of the next would span most ids of both and
    decode most of their row groups.
    """
    home = census.group_by("subject_id").agg(pl.col("events").sum(), home=pl.col("file").min())
    subjects = (
        studies_per_subject.join(home, on="subject_id")
        .sort("home", "subject_id")
        .with_columns(weight=pl.col("events") + pl.col("studies") * width)
    )
    subjects = subjects.with_columns(part=_greedy_parts(subjects["home"], subjects["weight"], rows))
    chunks = subjects.group_by("part", maintain_order=True).agg("subject_id", pl.col("weight").sum())
    chunk_files = (
        census.join(subjects.select("subject_id", "part"), on="subject_id")
        .group_by("part")
        .agg(pl.col("file").unique().sort())
    )
    return [
        SubjectChunk(
            subjects=pl.Series("subject_id", row["subject_id"], dtype=pl.Int64),
            files=tuple(files[index] for index in row["file"]),
            rows=row["weight"],
        )
        for row in chunks.join(chunk_files, on="part", maintain_order="left").iter_rows(named=True)
    ]


def _greedy_parts(homes: pl.Series, weights: pl.Series, rows: int) -> pl.Series:
    """Each subject's chunk (subjects sorted by home file): a new one at a new file or when full."""
    parts, part, filled, last_home = [], -1, 0, None
    for home, weight in zip(homes.to_list(), weights.to_list(), strict=True):
        if home != last_home or filled + weight > rows:
            part, filled, last_home = part + 1, 0, home
        parts.append(part)
        filled += weight
    return pl.Series("part", parts, dtype=pl.Int64)
