"""Per-study tables joined to a prepared cache: one reader, the report table and the label table.

A table is a parquet or CSV file with an id column (`study_id` by default). Ids are matched to
the cache's study ids with a NIfTI suffix removed, so a report table keyed by volume file
name (CT-RATE's `VolumeName`: "valid_1_a_1.nii.gz") joins to study "valid_1_a_1". Report
tables read from CSV keep every column as a string: an id like "0012" must not become 12.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from fm3d.data.cache import INDEX_FILE, PreparedCache
from fm3d.data.errors import DataError
from fm3d.data.io import NIFTI_SUFFIXES

DEFAULT_LABEL_COLUMNS: tuple[str, ...] = ("phenotype", "tte_time", "tte_event")
DEFAULT_REPORT_COLUMNS: tuple[str, ...] = ("findings", "impression")


class TableError(DataError):
    """A reports or labels table cannot be joined to the studies (missing columns, ragged arrays)."""


def study_id_from_name(name: str) -> str:
    """A study id from an id or volume file name: the NIfTI suffix removed."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_table(path: str | Path, id_column: str = "study_id", as_strings: bool = False) -> pl.DataFrame:
    """A parquet or CSV table with `id_column` as strings (`as_strings`: every CSV column as a string)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(path, "does not exist", "check the path given for the reports/labels table")
    if path.suffix.lower() == ".csv":
        table = pl.read_csv(path, infer_schema=not as_strings)
    else:
        table = pl.read_parquet(path)
    if id_column not in table.columns:
        raise TableError(
            path,
            f"has no {id_column} column (columns: {table.columns})",
            "add one to join by study, or name the id column in data.id_column",
        )
    return table.with_columns(pl.col(id_column).cast(pl.String))


class ReportTable:
    """Report text by study id: the chosen text columns, empty cells skipped, joined with a newline."""

    def __init__(
        self,
        table: pl.DataFrame,
        columns: Sequence[str],
        source: str | Path = "<reports>",
        id_column: str = "study_id",
    ) -> None:
        missing = [c for c in (id_column, *columns) if c not in table.columns]
        if missing:
            raise TableError(
                source,
                f"lacks the columns {missing} (has {table.columns})",
                "set data.report_columns to its text columns and data.id_column to its study id column",
            )
        cells = [pl.col(c).cast(pl.String).str.strip_chars() for c in columns]
        texts = table.select(
            pl.col(id_column).cast(pl.String),
            pl.concat_str([pl.when(c != "").then(c) for c in cells], separator="\n", ignore_nulls=True)
            .fill_null("")
            .alias("text"),
        )
        self._text = {study_id_from_name(sid): text for sid, text in texts.iter_rows() if sid is not None}

    @classmethod
    def read(cls, path: str | Path, columns: Sequence[str], id_column: str = "study_id") -> ReportTable:
        """The report table in a CSV (every column read as a string) or parquet file."""
        return cls(read_table(path, id_column, as_strings=True), columns, path, id_column)

    @classmethod
    def from_index(cls, cache: PreparedCache, columns: Sequence[str]) -> ReportTable:
        """The report columns a manifest carried into the cache index."""
        return cls(cache.index, columns, cache.root / INDEX_FILE)

    def get(self, study_id: str) -> str:
        """The report, or "" when the study has none."""
        return self._text.get(study_id, "")

    def study_ids_with_text(self) -> list[str]:
        """Studies with a non-empty report, in table order."""
        return [sid for sid, text in self._text.items() if text]


class LabelTable:
    """Per-study label arrays by study_id, one fixed-width array column each (meaning unknown here).

    Boolean columns stay boolean, everything else becomes float32; a study absent from the
    table gets zeros and `has_ehr` False, as does a row whose own `has_ehr` column is False.
    """

    def __init__(self, table: pl.DataFrame, columns: Sequence[str], source: str | Path = "<labels>") -> None:
        self.columns = tuple(columns)
        self.arrays: dict[str, np.ndarray] = {}
        for name in self.columns:
            if name not in table.columns:
                raise TableError(
                    source, f"lacks label column {name!r} (has {table.columns})", "set data.label_columns"
                )
            column = table[name]
            if isinstance(column.dtype, pl.List):
                widths = column.list.len().unique().to_list()
                if len(widths) != 1 or column.null_count():
                    raise TableError(source, f"column {name!r} has rows of lengths {widths} or nulls",
                                     "every study needs an array of the same length")  # fmt: skip
                column = column.list.to_array(int(widths[0]))
            if not isinstance(column.dtype, pl.Array):
                raise TableError(source, f"column {name!r} is {column.dtype}, not an array per study",
                                 "write one list/array value per study")  # fmt: skip
            values = column.to_numpy()
            boolean = column.dtype.inner == pl.Boolean
            self.arrays[name] = values.astype(np.bool_ if boolean else np.float32).reshape(len(column), -1)
        self._row = {sid: i for i, sid in enumerate(table["study_id"].to_list())}
        # A table may itself flag rows without usable EHR (e.g. `fm3d ehr labels`' has_ehr).
        flags = table["has_ehr"].fill_null(False).cast(pl.Boolean) if "has_ehr" in table.columns else None
        self._has_ehr = np.ones(table.height, bool) if flags is None else flags.to_numpy()

    @classmethod
    def read(cls, path: str | Path, columns: Sequence[str]) -> LabelTable:
        """The label table in a parquet file (CSV cannot hold array columns)."""
        return cls(read_table(path), columns, path)

    @property
    def widths(self) -> dict[str, int]:
        return {name: array.shape[1] for name, array in self.arrays.items()}

    def get(self, study_id: str) -> tuple[dict[str, np.ndarray], bool]:
        """(arrays, present): zeros and False for a study the table does not list."""
        row = self._row.get(study_id)
        if row is None:
            return {
                n: np.zeros_like(a[0]) if len(a) else np.zeros(0, a.dtype) for n, a in self.arrays.items()
            }, False
        return {name: array[row] for name, array in self.arrays.items()}, bool(self._has_ehr[row])
