"""File helpers the adapters share: publishers' CSV tables read as text, NIfTI written atomically.

Publishers' tables are read with every column as a string (an id like "0012" must stay "0012";
a label column is turned into booleans only once the adapter knows it is one), and a missing
column is reported by name with the nearest one the file has.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from fm3d.atomic import atomic_path
from fm3d.cli_errors import did_you_mean
from fm3d.data.public.registry import DatasetLayoutError


def read_text_table(path: Path, required: Sequence[str], separator: str = ",") -> pl.DataFrame:
    """A CSV as strings, its header checked for `required` columns (a UTF-8 BOM is dropped)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle, delimiter=separator))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetLayoutError(path, f"cannot be read as CSV ({exc})", "re-download the file") from exc
    if not rows:
        raise DatasetLayoutError(path, "is empty", "re-download the file")
    header = [name.strip() for name in rows[0]]
    check_columns(path, header, required)
    width = len(header)
    body = [row + [""] * (width - len(row)) if len(row) < width else row[:width] for row in rows[1:] if row]
    columns = list(zip(*body, strict=True)) if body else [() for _ in header]
    return pl.DataFrame(
        {
            name: pl.Series(name, list(values), dtype=pl.String)
            for name, values in zip(header, columns, strict=True)
        }
    )


def check_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    """Refuse a table that lacks a required column, naming it and the nearest column it has."""
    for name in required:
        if name not in header:
            raise DatasetLayoutError(
                path,
                f"has no column {name!r}{did_you_mean(name, header, quote=chr(39))} (its columns: "
                f"{', '.join(header[:12])}{', ...' if len(header) > 12 else ''})",
                "this is not the file the publishers ship; re-download it",
            )


def as_flags(column: pl.Series, missing: Sequence[str] = ("", "-1")) -> pl.Series:
    """A 0/1 text column as booleans; the `missing` codes (and nulls) become null: not known."""
    text = column.cast(pl.String).str.strip_chars()
    known = ~text.is_in(list(missing)) & text.is_not_null()
    number = text.cast(pl.Float64, strict=False)
    return pl.select(pl.when(known).then(number == 1.0).otherwise(None).alias(column.name)).to_series()


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a gzipped NIfTI with sform and qform set (fm3d refuses a NIfTI without them), atomically."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as temp:
        temp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1))


def for_manifest(path: Path, out: Path) -> str:
    """A manifest path: relative to the output folder for files written there, absolute otherwise."""
    path = path.resolve()
    try:
        return path.relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def nifti_stem(name: str) -> str:
    """A file name without its .nii.gz or .nii suffix."""
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
