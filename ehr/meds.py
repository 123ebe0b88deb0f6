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


class MEDSDataset:
    """A validated MEDS dataset folder; every table comes back as a polars LazyFrame.

    Opening checks each data file's schema (from the parquet footer, cheap) and, unless
    `check_sorted=False`, that each file keeps a subject's events contiguous and sorted by time
    with static (null-time) events first, as MEDS requires; that reads `subject_id` and
    `time` of every file once.
    """

    def __init__(self, root: str | Path, *, check_sorted: bool = True) -> None:
        self.root = Path(root)
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
        self.schemas = {path: pl.read_parquet_schema(path) for path in self.files}
        for path, schema in self.schemas.items():
            _check_event_schema(path, schema)
        self.metadata = self._read_metadata()
        self.meds_version: str | None = self.metadata.get("meds_version")
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
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MEDSFormatError(path, f"is not valid JSON ({error})", "fix or remove the file") from error

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
