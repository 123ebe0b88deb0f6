"""Per-study EHR labels: phenotype multi-hot and MOTOR time-to-event targets, built with polars joins.

For each study (study_id, subject_id, study_time):
- `phenotype[p]` = 1 when a code of group p is recorded in
  `[study_time - before, study_time + after]` (days, both ends inclusive);
- `tte_time[k]`, `tte_event[k]` (MOTOR's definition) = days from study_time to the first event
  of task k strictly after study_time, with event True; else days to the subject's last timed
  event (censoring), with event False.

Every study comes back (a missing modality is a mask, never a dropped sample). `ehr_status`
says why a study has no usable EHR: `unknown_subject` (no timed events for the subject) or
`no_followup` (the study is at or after the subject's last event, so nothing can be observed
after it). Those rows get `has_ehr = False` and zeros in every label column, are counted in the
summary and logged as a warning.

Both label kinds match a (study x task / group) grid against sorted event times (a stacked
sort + backward fill, an as-of join), so the cost is O(events + studies x (tasks + groups))
with no per-study Python loop; only the subject_id, time and code columns are scanned, filtered
to the studies' subjects and the codes needed, and collected with polars' streaming engine.
Subjects are labelled a chunk at a time (`ehr.subject_chunks`, `memory_budget_mib`), so peak
memory stays flat as the data grows; the labels do not depend on the chunking.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from ehr.binning import quantile_bin_edges
from ehr.errors import EHRSettingError, TaskSpecError
from ehr.meds import MEDSDataset
from ehr.studies import check_studies
from ehr.subject_chunks import (
    DEFAULT_MEMORY_BUDGET_MIB,
    SubjectChunk,
    budget_rows,
    plan_subject_chunks,
    subject_census,
)
from ehr.vocab import code_ancestors, phenotype_codes, validate_phenotypes
from fm3d.atomic import atomic_path, write_text_atomic
from fm3d.train.progress import progress

logger = logging.getLogger(__name__)

_US_PER_DAY = 86_400_000_000.0
METADATA_KEY = "fm3d.ehr_labels"  # parquet key-value metadata entry holding the column meanings


def _to_days(delta: pl.Expr) -> pl.Expr:
    return (delta.dt.total_microseconds() / _US_PER_DAY).cast(pl.Float32)


def _grid(studies: pl.DataFrame, size: int, name: str) -> pl.DataFrame:
    """studies x range(size), sorted by study_time (the order an as-of join on it needs)."""
    index = pl.DataFrame({name: np.arange(size, dtype=np.uint32)})
    return studies.join(index, how="cross").sort("study_time")


def _fill(values: np.ndarray, long: pl.DataFrame, column: str, rows: np.ndarray) -> None:
    """Scatter a (row, index)-sorted long column into the `rows` (sorted) of a [studies, width] array."""
    values[rows] = long[column].to_numpy().reshape(len(rows), values.shape[1])


def _list_column(name: str, values: np.ndarray) -> pl.Series:
    """A [studies, width] array as the list column the label table stores."""
    inner = pl.Float32 if values.dtype == np.float32 else pl.Boolean
    return pl.Series(name, values).cast(pl.List(inner))


def _next_event_after(grid: pl.DataFrame, events: pl.DataFrame, key: str) -> pl.Series:
    """For each grid row, the first event time of the same (subject_id, key) strictly after study_time.

    Studies and events are stacked and sorted by (subject_id, key, time) with events first on
    ties, so a backward fill hands each study the next later event; a fill that crossed into
    another group is discarded. Cheaper in memory than an as-of join with `by` groups.
    """
    stacked = pl.concat(
        [
            events.select("subject_id", key, "time", event_time="time", position=pl.lit(None, pl.UInt32)),
            grid.select(
                "subject_id",
                key,
                time="study_time",
                event_time=pl.lit(None, pl.Datetime("us")),
                position=pl.int_range(pl.len(), dtype=pl.UInt32),
            ),
        ]
    ).sort("subject_id", key, "time", "position", nulls_last=False)  # null position = event first
    is_event = pl.col("position").is_null()
    filled = stacked.select(
        "position",
        event_time=pl.col("event_time").backward_fill(),
        same_group=(pl.when(is_event).then(pl.col("subject_id")).backward_fill() == pl.col("subject_id"))
        & (pl.when(is_event).then(pl.col(key)).backward_fill() == pl.col(key)),
    ).filter(pl.col("position").is_not_null())
    result = filled.sort("position").select(pl.when("same_group").then("event_time"))
    return result.to_series().rename("next_event_time")


def build_study_labels(
    dataset: MEDSDataset,
    studies: pl.DataFrame,
    tasks: Sequence[str],
    phenotypes: Mapping[str, list[str]] | None = None,
    window_days: tuple[float, float] = (365.0, 30.0),
    *,
    expand_parents: bool = False,
    memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB,
) -> pl.DataFrame:
    """Label every study with phenotype multi-hot and time-to-event targets.

    Args:
        dataset: the MEDS dataset.
        studies: study_id, subject_id, study_time (see `check_studies`).
        tasks: task codes, in the column order of `tte_time` / `tte_event`.
        phenotypes: group -> code prefixes (order = `phenotype` columns); None = no phenotypes.
        window_days: (before, after) days around study_time in which phenotype codes count.
        expand_parents: an event also counts for tasks that are its `parent_codes` ancestors
            (use with tasks selected by `select_tasks(..., expand_parents=True)`).
        memory_budget_mib: about how much memory one chunk of subjects may take (beyond the
            scan's buffers and the output); subjects are labelled in chunks of this size, so
            the peak stays flat as the data grows. The labels do not depend on it.

    Returns:
        One row per study, in input order: study_id, subject_id, study_time, has_ehr,
        ehr_status, followup_days, phenotype list[f32] (P), tte_time list[f32] (K, days),
        tte_event list[bool] (K).
    """
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise TaskSpecError(dataset.root, "tasks must be a non-empty list of distinct codes")
    phenotypes = validate_phenotypes(phenotypes) if phenotypes else {}
    before, after = (float(w) for w in window_days)
    if before < 0 or after < 0:
        raise TaskSpecError(dataset.root, f"window_days must be non-negative, got {window_days}")
    if not memory_budget_mib > 0:
        raise EHRSettingError(
            f"memory_budget_mib must be positive, got {memory_budget_mib} "
            f"(the default, {DEFAULT_MEMORY_BUDGET_MIB:g} MiB, suits most datasets)"
        )
    studies = check_studies(studies, policy=dataset.policy).with_row_index("row")

    task_codes = pl.DataFrame({"code": tasks, "task": np.arange(len(tasks), dtype=np.uint32)})
    if expand_parents:  # an event of code c counts for every task that is c or one of its ancestors
        descendants = code_ancestors(dataset).join(task_codes, left_on="ancestor", right_on="code")
        task_codes = pl.concat([task_codes, descendants.select("code", "task")]).unique()

    census = subject_census(dataset, pl.Series(studies["subject_id"].unique(), dtype=pl.Int64))
    last = census.group_by("subject_id").agg(pl.col("last_time").max())
    studies = studies.join(last, on="subject_id", how="left").with_columns(
        ehr_status=pl.when(pl.col("last_time").is_null())
        .then(pl.lit("unknown_subject"))
        .when(pl.col("study_time") >= pl.col("last_time"))
        .then(pl.lit("no_followup"))
        .otherwise(pl.lit("ok"))
    )
    studies = studies.sort("row").with_columns(has_ehr=pl.col("ehr_status") == "ok")
    for status in ("unknown_subject", "no_followup"):
        count = int((studies["ehr_status"] == status).sum())
        if count:
            logger.warning(
                "%d of %d studies have ehr_status=%s: has_ehr=False, zero labels", count, len(studies), status
            )

    # Subject chunk by subject chunk (a study's labels need only its subject's events), each
    # chunk one streaming pass over the files holding its subjects, filtered before any join:
    # peak memory follows the chunk size, not the dataset (ehr/subject_chunks.py).
    ok = studies.filter("has_ehr").select("row", "subject_id", "study_time", "last_time")
    chunks = plan_subject_chunks(
        census,
        ok.group_by("subject_id").agg(studies=pl.len()),
        width=len(tasks) + len(phenotypes),
        rows=budget_rows(memory_budget_mib),
        files=dataset.files,
    )
    tte_time = np.zeros((studies.height, len(tasks)), dtype=np.float32)
    tte_event = np.zeros((studies.height, len(tasks)), dtype=np.bool_)
    phenotype = np.zeros((studies.height, len(phenotypes)), dtype=np.float32)
    any_prefix = "^(?:" + "|".join(re.escape(p) for group in phenotypes.values() for p in group) + ")"
    seen_tasks: set[int] = set()
    for chunk, chunk_ok in progress(
        zip(chunks, _studies_by_chunk(ok, chunks), strict=True),
        desc="labels: subject chunks",
        total=len(chunks),
        unit="chunk",
        disable=len(chunks) < 4,
    ):
        events = chunk.events(dataset, columns=("subject_id", "time", "code"))
        rows = chunk_ok["row"].to_numpy()
        task_events = (
            events.filter(pl.col("code").is_in(task_codes["code"].implode()))
            .join(task_codes.lazy(), on="code")
            .select("subject_id", "task", "time")
            .unique()
            .collect(engine="streaming")
        )
        seen_tasks.update(task_events["task"].unique().to_list())
        tte = _time_to_event(chunk_ok, task_events, len(tasks))
        _fill(tte_time, tte, "tte_time", rows)
        _fill(tte_event, tte, "tte_event", rows)
        if phenotypes:
            matched = events.filter(pl.col("code").str.contains(any_prefix)).collect(engine="streaming")
            group_events = (
                matched.join(phenotype_codes(matched["code"], phenotypes), on="code")
                .select("subject_id", "group", "time")
                .unique()
            )
            window = _phenotype_window(chunk_ok, group_events, len(phenotypes), before, after)
            _fill(phenotype, window, "phenotype", rows)
    absent = sorted(set(tasks) - {tasks[k] for k in seen_tasks})
    if absent:
        logger.warning(
            "%d task code(s) never occur for these subjects (all censored), e.g. %s", len(absent), absent[:3]
        )

    followup = pl.when(pl.col("has_ehr")).then(_to_days(pl.col("last_time") - pl.col("study_time")))
    return studies.select(
        "study_id",
        "subject_id",
        "study_time",
        "has_ehr",
        "ehr_status",
        followup_days=followup.otherwise(0.0).cast(pl.Float32),
    ).with_columns(
        _list_column("phenotype", phenotype)
        if phenotypes
        else pl.Series("phenotype", [[]] * len(studies), dtype=pl.List(pl.Float32)),
        _list_column("tte_time", tte_time),
        _list_column("tte_event", tte_event),
    )


def _studies_by_chunk(ok: pl.DataFrame, chunks: list[SubjectChunk]) -> list[pl.DataFrame]:
    """The studies of each chunk's subjects, in row order (one join, not a filter per chunk)."""
    if not chunks:
        return []
    chunk_of = pl.DataFrame(
        {
            "subject_id": pl.concat([chunk.subjects for chunk in chunks]),
            "chunk": np.repeat(np.arange(len(chunks), dtype=np.uint32), [len(c.subjects) for c in chunks]),
        }
    )
    parts = (
        ok.join(chunk_of, on="subject_id").sort("row").partition_by("chunk", as_dict=True, include_key=False)
    )
    return [parts[(index,)] for index in range(len(chunks))]


def _time_to_event(ok: pl.DataFrame, task_events: pl.DataFrame, num_tasks: int) -> pl.DataFrame:
    """tte_time (days) and tte_event per (row, task) of the studies `ok`, sorted by (row, task)."""
    grid = _grid(ok, num_tasks, "task")
    next_time = _next_event_after(grid, task_events, "task")
    return grid.with_columns(
        tte_event=next_time.is_not_null(),
        tte_time=_to_days(pl.coalesce(next_time, grid["last_time"]) - grid["study_time"]),
    ).sort("row", "task")


def _phenotype_window(
    ok: pl.DataFrame, group_events: pl.DataFrame, num_groups: int, before: float, after: float
) -> pl.DataFrame:
    """phenotype (1.0 when a group event lies in the window) per (row, group), sorted by (row, group).

    A forward as-of join from the window start finds each (subject, group)'s first event at
    or after it; the study has the phenotype when that event is also before the window end.
    """
    return (
        _grid(ok.select("row", "subject_id", "study_time"), num_groups, "group")
        .with_columns(window_start=pl.col("study_time") - pl.duration(microseconds=int(before * _US_PER_DAY)))
        .sort("window_start")
        .join_asof(
            group_events.sort("time"),
            left_on="window_start",
            right_on="time",
            by=["subject_id", "group"],
            strategy="forward",
            check_sortedness=False,
        )
        .with_columns(
            phenotype=(
                pl.col("time").is_not_null()
                & (
                    pl.col("time")
                    <= pl.col("study_time") + pl.duration(microseconds=int(after * _US_PER_DAY))
                )
            ).cast(pl.Float32)
        )
        .sort("row", "group")
    )


def _stacked_with_ehr(labels: pl.DataFrame, column: str) -> np.ndarray:
    """A list column's rows of the studies with EHR as a [studies with EHR, width] array.

    Through a fixed-size array column, a view of polars' buffer for floats, rather than
    `np.stack(column.to_numpy())`, which makes a numpy object per row and, on 50k studies x 64
    tasks, peaks at 3.5x the values' size; rows are copied only when some study lacks EHR.
    """
    width = int(labels[column].list.len().max() or 0)
    values = labels[column].list.to_array(width).to_numpy()
    has_ehr = labels["has_ehr"].to_numpy()
    return values if has_ehr.all() else values[has_ehr]


def summarize_labels(labels: pl.DataFrame, tasks: Sequence[str], phenotype_names: Sequence[str]) -> dict:
    """Counts per ehr_status, and per task / phenotype the event rate among studies with EHR."""
    status = dict(labels.group_by("ehr_status").len().iter_rows())
    with_ehr = int(labels["has_ehr"].sum())
    summary = {
        "studies": labels.height,
        "with_ehr": with_ehr,
        "unknown_subject": status.get("unknown_subject", 0),
        "no_followup": status.get("no_followup", 0),
        "tasks": [],
        "phenotypes": [],
    }
    if with_ehr:
        events = _stacked_with_ehr(labels, "tte_event")
        times = _stacked_with_ehr(labels, "tte_time")
        for k, code in enumerate(tasks):
            hit = events[:, k]
            summary["tasks"].append(
                {
                    "code": code,
                    "event_rate": float(hit.mean()),
                    "median_days_to_event": float(np.median(times[hit, k])) if hit.any() else None,
                }
            )
        if phenotype_names:
            multi_hot = _stacked_with_ehr(labels, "phenotype")
            for p, name in enumerate(phenotype_names):
                summary["phenotypes"].append({"group": name, "prevalence": float(multi_hot[:, p].mean())})
    return summary


def suggest_bin_edges(labels: pl.DataFrame, num_bins: int = 8) -> list[float] | None:
    """Bin edges from quantiles of the observed event times in these labels (None without events)."""
    if not labels["has_ehr"].any():
        return None
    events = _stacked_with_ehr(labels, "tte_event")
    if not events.any():
        return None
    return quantile_bin_edges(_stacked_with_ehr(labels, "tte_time")[events], num_bins)


def write_study_labels(
    labels: pl.DataFrame,
    out: str | Path,
    *,
    tasks: Sequence[str],
    phenotypes: Mapping[str, list[str]] | None,
    window_days: tuple[float, float],
    num_bins: int = 8,
    dropped_events: Mapping[str, int] | None = None,
) -> dict:
    """Write the label parquet plus `<out>.json`, both carrying what the columns mean.

    The description (phenotype group names and prefixes, task codes, suggested bin edges, the
    window and the summary) goes into the parquet key-value metadata under `fm3d.ehr_labels`
    and, for people and tools that do not read parquet footers, into a sidecar JSON.
    `dropped_events` (the dataset's `dropped`) is recorded, so a label table built with
    `--drop-invalid` says what it left out. Both files are written atomically: a reader, or a
    re-run after a kill, never finds half a table. Returns that description.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    phenotypes = dict(phenotypes or {})
    description = {
        "format": "fm3d.ehr_labels/1",
        "key": "study_id",
        "phenotype_groups": list(phenotypes),
        "phenotype_prefixes": phenotypes,
        "window_days": list(window_days),
        "tasks": list(tasks),
        "tte_time_unit": "days",
        "suggested_bin_edges_days": suggest_bin_edges(labels, num_bins),
        "summary": summarize_labels(labels, tasks, list(phenotypes)),
        "dropped_invalid_events": dict(dropped_events or {}),
    }
    text = json.dumps(description, indent=2)
    with atomic_path(out) as temp:
        labels.write_parquet(temp, metadata={METADATA_KEY: text})
    write_text_atomic(f"{out}.json", text + "\n")
    return description


def read_label_description(path: str | Path) -> dict:
    """The description `write_study_labels` stored in a label parquet's key-value metadata."""
    metadata = pl.read_parquet_metadata(path)
    if METADATA_KEY not in metadata:
        raise TaskSpecError(path, f"has no `{METADATA_KEY}` metadata", "write it with `fm3d ehr labels`")
    return json.loads(metadata[METADATA_KEY])
