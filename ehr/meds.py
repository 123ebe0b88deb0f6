"""Read a MEDS dataset folder lazily with polars, after checking it really is MEDS.

A MEDS root holds `data/**/*.parquet` (events), `metadata/codes.parquet`,
`metadata/subject_splits.parquet` and `metadata/dataset.json`. The installed `meds` package's
`DataSchema` is the reference for the event columns:

| column          | type                     | MEDS 0.3                 | MEDS 0.4              |
|-----------------|--------------------------|--------------------------|-----------------------|
| `subject_id`    | int64, not null          | required                 | required              |
| `time`          | timestamp (null = static)| required                 | required              |
| `code`          | string, not null         | required                 | required              |
| `numeric_value` | float32                  | required (may hold null) | optional column       |
| `text_value`    | (large) string           | optional                 | optional              |

In `codes.parquet`, 0.3 requires `description` and `parent_codes` while 0.4 makes them
optional; 0.4's `dataset.json` adds lists of extension columns (`code_modifier_columns`, ...).
fm3d accepts both: missing optional columns come back as nulls, float64 `numeric_value` and
any timestamp unit are cast to MEDS's float32 / microseconds, extra columns are allowed (and
ignored unless asked for). Anything else is a `MEDSFormatError` naming the file and column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import meds
import polars as pl

from ehr.errors import MEDSFormatError
from ehr.validity import ValidityPolicy, enforce

logger = logging.getLogger(__name__)

CORE_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value")
_TIME = pl.Datetime("us")


def _check_event_schema(path: Path, schema: pl.Schema) -> None:
    """Raise MEDSFormatError naming `path` and the column when `schema` is not MEDS."""
    if "subject_id" not in schema and "patient_id" in schema:
        raise MEDSFormatError(
            path,
            "has `patient_id` but no `subject_id` column",
            "MEDS < 0.3 data: rename patient_id to subject_id",
        )
    for column in ("subject_id", "time", "code"):
        if column not in schema:
            raise MEDSFormatError(
                path,
                f"missing required MEDS column `{column}` (found: {', '.join(schema.names())})",
                f"MEDS events need {', '.join(meds.DataSchema.required_columns())}",
            )
    expectations = {
        "subject_id": (lambda d: d == pl.Int64, "int64", "cast it to int64"),
        "time": (
            lambda d: isinstance(d, pl.Datetime) and d.time_zone is None,
            "timestamp without time zone",
            "store naive timestamps (MEDS has no time zone)",
        ),
        "code": (lambda d: d in (pl.String, pl.Categorical), "string", "cast it to string"),
        "numeric_value": (
            lambda d: d in (pl.Float32, pl.Float64),
            "float32 (or float64)",
            "cast it to float32",
        ),
        "text_value": (lambda d: d == pl.String, "string", "cast it to string"),
    }
    for column, (ok, wanted, hint) in expectations.items():
        if column in schema and not ok(schema[column]):
            raise MEDSFormatError(
                path, f"column `{column}` has dtype {schema[column]}, MEDS needs {wanted}", hint
            )


def _read_schema(path: Path) -> pl.Schema:
    """A shard's schema from its parquet footer; a file that is not parquet is named, not a polars trace."""
    try:
        return pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise MEDSFormatError(
            path,
            f"is not a readable parquet file ({str(error).splitlines()[0]})",
            "the shard is truncated or not parquet: write it again, or move it out of data/",
        ) from error


class MEDSDataset:
    """A validated MEDS dataset folder; every table comes back as a polars LazyFrame.

    Opening checks each data file's schema (from the parquet footer, cheap), counts events no
    label can use (a null code, a time outside `policy.valid_years`) and, unless
    `check_sorted=False`, that each file keeps a subject's events contiguous and sorted by time
    with static (null-time) events first, as MEDS requires; that reads `subject_id`, `time`
    and `code` of every file once. Unusable events are refused with their counts unless
    `policy.drop_invalid`, in which case `events()` leaves them out and `dropped` counts them.
    """

    def __init__(
        self, root: str | Path, *, check_sorted: bool = True, policy: ValidityPolicy | None = None
    ) -> None:
        self.root = Path(root)
        self.policy = policy or ValidityPolicy()
        data_dir = self.root / meds.data_subdirectory
        if not data_dir.is_dir():
            raise MEDSFormatError(
                self.root,
                "has no data/ folder",
                "point at the MEDS root, the folder holding data/ and metadata/",
            )
        self.files = sorted(data_dir.rglob("*.parquet"))
        if not self.files:
            raise MEDSFormatError(
                data_dir, "holds no *.parquet files", "convert the events to MEDS parquet shards"
            )
        self.schemas = {path: _read_schema(path) for path in self.files}
        for path, schema in self.schemas.items():
            _check_event_schema(path, schema)
        self.metadata = self._read_metadata()
        self.meds_version: str | None = self.metadata.get("meds_version")
        self.dropped = self._check_usable()
        if check_sorted:
            for path in self.files:
                self._check_sorted(path)

    def __repr__(self) -> str:
        return f"MEDSDataset({str(self.root)!r}, files={len(self.files)}, meds_version={self.meds_version!r})"

    def _read_metadata(self) -> dict:
        path = self.root / meds.dataset_metadata_filepath
        if not path.is_file():
            logger.warning("%s is missing; continuing without dataset metadata", path)
            return {}
        try:
            metadata = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MEDSFormatError(path, f"is not valid JSON ({error})", "fix or remove the file") from error
        if not isinstance(metadata, dict):
            raise MEDSFormatError(
                path, f"holds a JSON {type(metadata).__name__}, not an object", "fix or remove the file"
            )
        version = metadata.get("meds_version")
        if version is not None and not isinstance(version, str):
            raise MEDSFormatError(
                path, f"`meds_version` is {version!r}, not a string", 'write it as text, e.g. "0.3.3"'
            )
        return metadata

    def _usable(self) -> pl.Expr:
        """Events a label can use: a code, and a null (static) time or one in the plausible years."""
        time = pl.col("time")
        return pl.col("code").is_not_null() & (time.is_null() | self.policy.plausible(time.cast(_TIME)))

    def _check_usable(self) -> dict[str, int]:
        """Count null codes and implausible times over all shards; refuse, or return the counts to drop."""
        counts = {"null code": 0, f"time outside years {self.policy.valid_years}": 0}
        examples: dict[str, str] = {}
        time = pl.col("time").cast(_TIME)
        outside = time.is_not_null() & ~self.policy.plausible(time)
        for path in self.files:
            try:
                row = (
                    pl.scan_parquet(path)
                    .select(
                        null_code=pl.col("code").null_count(),
                        outside=outside.sum(),
                        example=time.filter(outside).first(),
                    )
                    .collect()
                    .row(0, named=True)
                )
            except pl.exceptions.PolarsError as error:
                raise MEDSFormatError(
                    path, f"cannot be read ({str(error).splitlines()[0]})", "write the shard again"
                ) from error
            kinds = dict(zip(counts, (row["null_code"], row["outside"]), strict=True))
            for kind, n in kinds.items():
                counts[kind] += n
                if n and kind not in examples:
                    where = path.relative_to(self.root)
                    examples[kind] = str(where) if kind == "null code" else f"{row['example']} in {where}"
        return enforce(self.root, "events", counts, examples, self.policy, MEDSFormatError)

    def _check_sorted(self, path: Path) -> None:
        subject, time = pl.col("subject_id"), pl.col("time")
        same_subject = (subject == subject.shift(1)).fill_null(False)
        backwards = same_subject & ((time < time.shift(1)) | (time.is_null() & time.shift(1).is_not_null()))
        stats = (
            pl.scan_parquet(path)
            .select(
                runs=(subject != subject.shift(1)).fill_null(True).sum(),
                subjects=subject.n_unique(),
                null_subjects=subject.null_count(),
                unsorted=backwards.fill_null(False).any(),
                first_unsorted=backwards.fill_null(False).arg_max(),
            )
            .collect()
            .row(0, named=True)
        )
        if stats["null_subjects"]:
            raise MEDSFormatError(path, f"column `subject_id` has {stats['null_subjects']} null values")
        if stats["runs"] != stats["subjects"]:
            raise MEDSFormatError(
                path,
                "events are not sorted by subject: a subject's rows are split into several runs",
                "sort each shard by (subject_id, time), e.g. df.sort('subject_id', 'time', nulls_last=False)",
            )
        if stats["unsorted"]:
            raise MEDSFormatError(
                path,
                f"events are not sorted by time within a subject (first at row {stats['first_unsorted']})",
                "sort each shard by (subject_id, time) with null (static) times first",
            )

    def events(
        self,
        subjects: Iterable[int] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        columns: Sequence[str] = CORE_COLUMNS,
        files: Sequence[Path] | None = None,
    ) -> pl.LazyFrame:
        """Events as one LazyFrame with MEDS dtypes; filters are pushed into the parquet scans.

        Args:
            subjects: keep only these subject ids.
            start, end: keep events with `start <= time < end` (static, null-time rows drop out).
            columns: core columns (missing optional ones are null-filled) plus any extra
                column present in every file.
            files: only these data files (from `self.files`), e.g. to process shard by shard.
        """
        frames = []
        for path in self.files if files is None else files:
            schema = self.schemas[Path(path)]
            selected = []
            for column in columns:
                if column in schema:
                    expression = pl.col(column)
                    if column in ("time", "numeric_value", "code"):
                        wanted = {"time": _TIME, "numeric_value": pl.Float32, "code": pl.String}[column]
                        expression = expression.cast(wanted)
                    selected.append(expression)
                elif column == "numeric_value":
                    selected.append(pl.lit(None, dtype=pl.Float32).alias(column))
                elif column == "text_value":
                    selected.append(pl.lit(None, dtype=pl.String).alias(column))
                else:
                    raise MEDSFormatError(
                        path, f"has no column `{column}`", "ask only for columns every shard has"
                    )
            frame = pl.scan_parquet(path)
            if self.dropped:
                frame = frame.filter(self._usable())
            if subjects is not None:
                ids = pl.Series(list(subjects), dtype=pl.Int64).implode()
                frame = frame.filter(pl.col("subject_id").is_in(ids))
            if start is not None:
                frame = frame.filter(pl.col("time") >= start)
            if end is not None:
                frame = frame.filter(pl.col("time") < end)
            frames.append(frame.select(selected))
        return pl.concat(frames, how="vertical")

    def codes(self) -> pl.LazyFrame:
        """`metadata/codes.parquet` with `code`, `description`, `parent_codes` (nulls where absent).

        Without the file, the codes seen in the data come back with null metadata (and a warning).
        """
        path = self.root / meds.code_metadata_filepath
        if not path.is_file():
            logger.warning("%s is missing; deriving the code list from the data", path)
            return (
                self.events(columns=("code",))
                .unique()
                .with_columns(
                    description=pl.lit(None, dtype=pl.String),
                    parent_codes=pl.lit(None, dtype=pl.List(pl.String)),
                )
            )
        schema = pl.read_parquet_schema(path)
        if "code" not in schema:
            raise MEDSFormatError(
                path, "missing required column `code`", "codes.parquet needs one row per code"
            )
        checks = {"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}
        for column, dtype in checks.items():
            if column in schema and schema[column] != dtype:
                raise MEDSFormatError(
                    path, f"column `{column}` has dtype {schema[column]}, MEDS needs {dtype}"
                )
        frame = pl.scan_parquet(path)
        if "description" not in schema:
            frame = frame.with_columns(description=pl.lit(None, dtype=pl.String))
        if "parent_codes" not in schema:
            frame = frame.with_columns(parent_codes=pl.lit(None, dtype=pl.List(pl.String)))
        return frame

    def splits(self) -> pl.LazyFrame:
        """`metadata/subject_splits.parquet`: `subject_id` (int64), `split` (train/tuning/held_out/...)."""
        path = self.root / meds.subject_splits_filepath
        if not path.is_file():
            raise MEDSFormatError(
                path, "does not exist", "write subject splits or split the subjects yourself"
            )
        schema = pl.read_parquet_schema(path)
        for column, dtype in (("subject_id", pl.Int64), ("split", pl.String)):
            if column not in schema:
                raise MEDSFormatError(path, f"missing required column `{column}`")
            if schema[column] != dtype:
                raise MEDSFormatError(
                    path, f"column `{column}` has dtype {schema[column]}, MEDS needs {dtype}"
                )
        return pl.scan_parquet(path).select("subject_id", "split")
