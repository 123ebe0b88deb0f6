"""`fm3d ehr labels` split over SLURM array tasks by subject, then merged into one label table.

A study's labels depend only on its own subject's events, so shard i of n (`--shard i/n`)
labels the studies whose subject id hashes to i (`fm3d.sharding`) and writes them, with their
description, to `<out>.shards/<i>-of-<n>.parquet`; each task reads only its subjects' events
(bounded memory per task), and a failed task is run again on its own. `--merge` checks that the
shards are one split built with one set of tasks, phenotypes and window, puts the rows back in
the studies table's order and writes `<out>` exactly as a single run would: the bin edges and
summary are computed over all studies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from ehr.errors import TaskSpecError
from ehr.labels import read_label_description, write_study_labels
from fm3d.sharding import Shard, complete_split

_SUFFIX = ".parquet"
# What every shard must share; the rest of a description (bin edges, summary) is per shard.
_SHARED = (
    "format",
    "phenotype_groups",
    "phenotype_prefixes",
    "window_days",
    "tasks",
    "dropped_invalid_events",
)


def shards_folder(out: Path) -> Path:
    """Where the shards of the label table `out` are written: `<out>.shards/`."""
    return out.with_name(out.name + ".shards")


def shard_file(out: Path, shard: Shard) -> Path:
    """The label table of one shard."""
    return shards_folder(out) / f"{shard.name}{_SUFFIX}"


def shard_studies(studies: pl.DataFrame, shard: Shard) -> pl.DataFrame:
    """The studies whose subject belongs to `shard` (all of them for the whole job)."""
    if shard.whole:
        return studies
    owned = [shard.owns(str(subject)) for subject in studies["subject_id"]]
    return studies.filter(pl.Series(owned, dtype=pl.Boolean))


def merge_label_shards(out: Path, studies: pl.DataFrame, *, num_bins: int) -> dict:
    """Write `out` from its shards in `studies` order, then remove them; the description written.

    Raises `ShardError` for a missing shard or two splits, `TaskSpecError` when shards were
    built with other settings or do not hold exactly the studies of the table.
    """
    folder = shards_folder(out)
    shards = complete_split(folder, _SUFFIX)
    descriptions = [(shard, read_label_description(path)) for shard, path in shards]
    reference = {key: descriptions[0][1].get(key) for key in _SHARED}
    for shard, description in descriptions[1:]:
        differing = [key for key in _SHARED if description.get(key) != reference[key]]
        if differing:
            raise TaskSpecError(
                shard_file(out, shard),
                f"was built with other {', '.join(differing)} than shard {descriptions[0][0]}",
                "run every array task with the same arguments, then merge again",
            )
    rows = pl.concat([pl.read_parquet(path) for _, path in shards], how="vertical")
    _check_same_studies(rows, studies, folder)
    labels = studies.select("study_id").join(rows, on="study_id", how="left", maintain_order="left")
    description = write_study_labels(
        labels,
        out,
        tasks=reference["tasks"],
        phenotypes=reference["phenotype_prefixes"],
        window_days=tuple(reference["window_days"]),
        num_bins=num_bins,
        dropped_events=reference["dropped_invalid_events"],
    )
    shutil.rmtree(folder)
    return description


def _check_same_studies(rows: pl.DataFrame, studies: pl.DataFrame, folder: Path) -> None:
    labelled, wanted = set(rows["study_id"]), set(studies["study_id"])
    if len(labelled) != rows.height or labelled != wanted:
        unlabelled, extra = sorted(wanted - labelled), sorted(labelled - wanted)
        found = [f"{len(unlabelled)} studies without labels (e.g. {unlabelled[0]})"] if unlabelled else []
        found += [f"{len(extra)} studies not in the table (e.g. {extra[0]})"] if extra else []
        found += ["a study in two shards"] if len(labelled) != rows.height else []
        raise TaskSpecError(
            folder,
            f"does not hold the studies of --studies: {'; '.join(found)}",
            "run every array task again with the same --studies, then merge",
        )
