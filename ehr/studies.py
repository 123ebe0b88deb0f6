"""The studies table (study_id, subject_id, study_time) that EHR labels are built for, read and checked.

CSV and parquet give the same table: ids as text, subject ids as int64, times as naive
datetime[us] (zoned or offset times converted to UTC first). Rows no label can use are counted
and refused, or dropped on request (see `ehr.validity`).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ehr.errors import StudyTableError
from ehr.validity import ValidityPolicy, enforce


def read_studies(
    path: str | Path, subject_column: str = "subject_id", policy: ValidityPolicy | None = None
) -> pl.DataFrame:
    """Load a studies table from CSV or parquet (columns study_id, subject_column, study_time)."""
    path = Path(path)
    if not path.is_file():
        raise StudyTableError(
            path, "does not exist", "pass a CSV or parquet with study_id, subject_id, study_time"
        )
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pl.read_parquet(path)
        else:
            table = pl.read_csv(path, infer_schema_length=10_000, try_parse_dates=True)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as error:
        raise StudyTableError(
            path,
            f"cannot be read as a table ({str(error).splitlines()[0]})",
            "write it again as CSV or parquet with study_id, subject_id, study_time",
        ) from error
    return check_studies(table, source=path, subject_column=subject_column, policy=policy)


def _as_naive_utc(time: pl.Series) -> pl.Series:
    """Study times as naive datetime[us]: strings parsed, dates at midnight, zoned times converted to UTC.

    MEDS times carry no zone. A time written with an offset (CSV "...+02:00", or a zoned parquet
    column) is converted to UTC before the zone is dropped, so the same instant gives the same
    label whichever file format carried it.
    """
    if time.dtype == pl.String:
        time = time.str.strip_chars().str.to_datetime(time_unit="us", strict=False)
    elif time.dtype == pl.Date:
        time = time.cast(pl.Datetime("us"))
    if not isinstance(time.dtype, pl.Datetime):
        return time
    if time.dtype.time_zone is not None:
        time = time.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return time.dt.cast_time_unit("us")


def _as_subject_ids(ids: pl.Series) -> pl.Series:
    """Integer subject ids; a value that is not a whole number (text, 12.5, NaN) becomes null."""
    if ids.dtype.is_integer():
        return ids.cast(pl.Int64)
    if ids.dtype.is_float():
        whole = ids.is_finite() & (ids == ids.floor())
        return pl.select(pl.when(whole).then(ids).cast(pl.Int64)).to_series().rename(ids.name)
    return ids.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)


def check_studies(
    studies: pl.DataFrame,
    source: str | Path = "<studies>",
    subject_column: str = "subject_id",
    policy: ValidityPolicy | None = None,
) -> pl.DataFrame:
    """Validate a studies table; normalise to study_id (str), subject_id (i64), study_time (datetime[us]).

    Rows with an empty study_id, a subject_id that is not an integer, or a study_time that is
    empty, unparseable or outside `policy.valid_years` are refused with their counts, or
    dropped (and logged) when `policy.drop_invalid`.
    """
    policy = policy or ValidityPolicy()
    if subject_column != "subject_id" and subject_column in studies.columns:
        studies = studies.drop("subject_id", strict=False).rename({subject_column: "subject_id"})
    missing = [c for c in ("study_id", "subject_id", "study_time") if c not in studies.columns]
    if missing:
        raise StudyTableError(
            source,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(studies.columns)})",
            "the studies table needs study_id, subject_id (or --subject-column) and study_time",
        )
    time = _as_naive_utc(studies["study_time"])
    if not isinstance(time.dtype, pl.Datetime):
        raise StudyTableError(source, f"column `study_time` has dtype {time.dtype}, expected a datetime")
    raw = studies.select("study_id", "subject_id", "study_time").with_row_index("row")
    studies = raw.with_columns(
        study_id=pl.col("study_id").cast(pl.String),
        subject_id=_as_subject_ids(studies["subject_id"]),
        study_time=time,
    )
    problems = {  # kind -> (column shown in the example, rows it flags)
        "empty study_id": (
            "study_id",
            pl.col("study_id").is_null() | (pl.col("study_id").str.strip_chars() == ""),
        ),
        "subject_id empty or not an integer": ("subject_id", pl.col("subject_id").is_null()),
        "study_time empty or unparseable": ("study_time", pl.col("study_time").is_null()),
        f"study_time outside years {policy.valid_years}": (
            "study_time",
            ~policy.plausible(pl.col("study_time")).fill_null(True),
        ),
    }
    flags = [f"_bad{i}" for i in range(len(problems))]
    flagged = studies.with_columns(
        **{flag: rows for flag, (_, rows) in zip(flags, problems.values(), strict=True)}
    )
    counts, examples = {}, {}
    for flag, (kind, (column, _)) in zip(flags, problems.items(), strict=True):
        hits = flagged.filter(flag)["row"]
        counts[kind] = hits.len()
        if hits.len():
            value = raw[column][hits[0]]
            examples[kind] = (
                f"row {hits[0] + 1}: {value!r}" if isinstance(value, str) else f"row {hits[0] + 1}: {value}"
            )
    if enforce(source, "studies", counts, examples, policy, StudyTableError):
        studies = flagged.filter(~pl.any_horizontal(flags))
    duplicated = studies.filter(pl.col("study_id").is_duplicated())["study_id"]
    if duplicated.len():
        raise StudyTableError(
            source, f"study_id values repeat (e.g. {duplicated[0]!r})", "study ids must be unique"
        )
    return studies.select("study_id", "subject_id", "study_time")
