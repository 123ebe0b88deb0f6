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
with no per-study Python loop; only the subject_id, time
and code columns are scanned, filtered to the studies' subjects and the codes needed, and
collected with polars' streaming engine.
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
from ehr.errors import TaskSpecError
from ehr.meds import MEDSDataset
from ehr.studies import check_studies
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


def _matrix(long: pl.DataFrame, column: str, rows: int, width: int, ok_rows: np.ndarray, dtype) -> pl.Series:
    """Scatter a (row, index)-sorted long column into a [rows, width] list column, zeros elsewhere."""
    values = np.zeros((rows, width), dtype=dtype)
    values[ok_rows] = long[column].to_numpy().reshape(len(ok_rows), width)
    inner = pl.Float32 if dtype == np.float32 else pl.Boolean
    return pl.Series(column, values).cast(pl.List(inner))


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
    studies = check_studies(studies, policy=dataset.policy).with_row_index("row")
    subject_ids = pl.Series(studies["subject_id"].unique(), dtype=pl.Int64).implode()

    task_codes = pl.DataFrame({"code": tasks, "task": np.arange(len(tasks), dtype=np.uint32)})
    if expand_parents:  # an event of code c counts for every task that is c or one of its ancestors
        descendants = code_ancestors(dataset).join(task_codes, left_on="ancestor", right_on="code")
        task_codes = pl.concat([task_codes, descendants.select("code", "task")]).unique()

    # Shard by shard (MEDS keeps a subject in one shard, and the results are merged anyway),
    # one streaming pass per table, each filtered before any join: peak memory stays at what
    # one shard's scan needs instead of polars reading ahead across all files.
    any_prefix = "^(?:" + "|".join(re.escape(p) for group in phenotypes.values() for p in group) + ")"
    lasts, task_parts, matched_parts = [], [], []
    for path in progress(
        dataset.files, desc="labels: scanning shards", unit="shard", disable=len(dataset.files) < 4
    ):
        events = dataset.events(columns=("subject_id", "time", "code"), files=[path]).filter(
            pl.col("time").is_not_null() & pl.col("subject_id").is_in(subject_ids)
        )
        lasts.append(
            events.group_by("subject_id").agg(last_time=pl.col("time").max()).collect(engine="streaming")
        )
        task_parts.append(
            events.filter(pl.col("code").is_in(task_codes["code"].implode()))
            .join(task_codes.lazy(), on="code")
            .select("subject_id", "task", "time")
            .unique()
            .collect(engine="streaming")
        )
        if phenotypes:
            matched_parts.append(
                events.filter(pl.col("code").str.contains(any_prefix)).collect(engine="streaming")
            )
    last = pl.concat(lasts).group_by("subject_id").agg(pl.col("last_time").max())
    task_events = pl.concat(task_parts)
    absent = sorted(set(tasks) - {tasks[k] for k in task_events["task"].unique().to_list()})
    if absent:
        logger.warning(
            "%d task code(s) never occur for these subjects (all censored), e.g. %s", len(absent), absent[:3]
        )
    if phenotypes:
        matched = pl.concat(matched_parts)
        group_events = (
            matched.join(phenotype_codes(matched["code"], phenotypes), on="code")
            .select("subject_id", "group", "time")
            .unique()
        )

    studies = studies.join(last, on="subject_id", how="left").with_columns(
        ehr_status=pl.when(pl.col("last_time").is_null())
        .then(pl.lit("unknown_subject"))
        .when(pl.col("study_time") >= pl.col("last_time"))
        .then(pl.lit("no_followup"))
        .otherwise(pl.lit("ok"))
    )
    studies = studies.sort("row").with_columns(has_ehr=pl.col("ehr_status") == "ok")
    ok = studies.filter("has_ehr")
    ok_rows = ok["row"].to_numpy()
    for status in ("unknown_subject", "no_followup"):
        count = int((studies["ehr_status"] == status).sum())
        if count:
            logger.warning(
                "%d of %d studies have ehr_status=%s: has_ehr=False, zero labels", count, len(studies), status
            )

    grid = _grid(ok.select("row", "subject_id", "study_time", "last_time"), len(tasks), "task")
    next_time = _next_event_after(grid, task_events, "task")
    tte = grid.with_columns(
        tte_event=next_time.is_not_null(),
        tte_time=_to_days(pl.coalesce(next_time, grid["last_time"]) - grid["study_time"]),
    ).sort("row", "task")
    columns = {
        "tte_time": _matrix(tte, "tte_time", len(studies), len(tasks), ok_rows, np.float32),
        "tte_event": _matrix(tte, "tte_event", len(studies), len(tasks), ok_rows, np.bool_),
    }
    if phenotypes:
        window = (
            _grid(ok.select("row", "subject_id", "study_time"), len(phenotypes), "group")
            .with_columns(
                window_start=pl.col("study_time") - pl.duration(microseconds=int(before * _US_PER_DAY))
            )
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
        columns["phenotype"] = _matrix(
            window, "phenotype", len(studies), len(phenotypes), ok_rows, np.float32
        )
    else:
        columns["phenotype"] = pl.Series("phenotype", [[]] * len(studies), dtype=pl.List(pl.Float32))

    followup = pl.when(pl.col("has_ehr")).then(_to_days(pl.col("last_time") - pl.col("study_time")))
    return studies.select(
        "study_id",
        "subject_id",
        "study_time",
        "has_ehr",
        "ehr_status",
        followup_days=followup.otherwise(0.0).cast(pl.Float32),
    ).with_columns(columns["phenotype"], columns["tte_time"], columns["tte_event"])


def summarize_labels(labels: pl.DataFrame, tasks: Sequence[str], phenotype_names: Sequence[str]) -> dict:
    """Counts per ehr_status, and per task / phenotype the event rate among studies with EHR."""
    with_ehr = labels.filter("has_ehr")
    status = dict(labels.group_by("ehr_status").len().iter_rows())
    summary = {
        "studies": labels.height,
        "with_ehr": with_ehr.height,
        "unknown_subject": status.get("unknown_subject", 0),
        "no_followup": status.get("no_followup", 0),
        "tasks": [],
        "phenotypes": [],
    }
    if with_ehr.height:
        events = np.stack(with_ehr["tte_event"].to_numpy()) if tasks else np.zeros((with_ehr.height, 0))
        times = np.stack(with_ehr["tte_time"].to_numpy()) if tasks else np.zeros((with_ehr.height, 0))
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
            multi_hot = np.stack(with_ehr["phenotype"].to_numpy())
            for p, name in enumerate(phenotype_names):
                summary["phenotypes"].append({"group": name, "prevalence": float(multi_hot[:, p].mean())})
    return summary


def suggest_bin_edges(labels: pl.DataFrame, num_bins: int = 8) -> list[float] | None:
    """Bin edges from quantiles of the observed event times in these labels (None without events)."""
    with_ehr = labels.filter("has_ehr")
    if with_ehr.is_empty():
        return None
    times = np.concatenate(with_ehr["tte_time"].to_numpy()) if with_ehr.height else np.empty(0)
    events = np.concatenate(with_ehr["tte_event"].to_numpy()) if with_ehr.height else np.empty(0, bool)
    if not events.any():
        return None
    return quantile_bin_edges(times[events], num_bins)


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
