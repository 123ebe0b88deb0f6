"""The `fm3d prepare` manifest: one row per study, read from CSV or parquet and checked up front.

Required columns are study_id and image_path; patient_id, label_path and a SeriesInstanceUID
column are optional, and any other column (report text, study_time, ...) is carried into the
index unchanged. Relative paths resolve against the manifest's own folder, so a manifest and
its images can move together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from fm3d.data.errors import ManifestError

# Read as text even when they look numeric: "007" must stay "007", not become 7.
_TEXT_COLUMNS = {"study_id": pl.String, "patient_id": pl.String}


def load_manifest(
    path: str | Path, *, series_uid_column: str | None = None, reserved: dict[str, Any] | None = None
) -> pl.DataFrame:
    """Read a manifest (CSV or parquet), check it, and resolve paths against its folder.

    Returns study_id, image_path (absolute), and when present patient_id, label_path,
    series_uid (from `series_uid_column`) and every other column unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "does not exist", "pass the CSV or parquet manifest with --manifest")
    try:
        frame = (
            pl.read_parquet(path)
            if path.suffix.lower() in (".parquet", ".pq")
            else pl.read_csv(path, infer_schema_length=10000, schema_overrides=_TEXT_COLUMNS)
        )
    except Exception as exc:  # polars raises compute, IO and parse errors
        raise ManifestError(
            path, f"cannot be read ({exc})", "use a CSV with a header row or a parquet file"
        ) from exc
    missing = [c for c in ("study_id", "image_path") if c not in frame.columns]
    if missing:
        raise ManifestError(
            path,
            f"lacks the required columns {missing} (it has {frame.columns})",
            "add study_id and image_path columns",
        )
    if series_uid_column is not None:
        if series_uid_column not in frame.columns:
            raise ManifestError(
                path,
                f"has no column {series_uid_column!r} named by --series-uid-column",
                f"pick one of {frame.columns}",
            )
        frame = (
            frame.rename({series_uid_column: "series_uid"}) if series_uid_column != "series_uid" else frame
        )
    clash = [
        c
        for c in frame.columns
        if c in (reserved or {}) and c not in ("study_id", "patient_id", "label_path")
    ]
    if clash:
        raise ManifestError(path, f"has columns {clash} that the index itself writes", "rename them")
    text = [
        c for c in ("study_id", "patient_id", "image_path", "label_path", "series_uid") if c in frame.columns
    ]
    frame = frame.with_columns(pl.col(c).cast(pl.String) for c in text)
    ids = frame["study_id"]
    bad = [s for s in ids.to_list() if not s or "/" in s or "\\" in s or s.startswith(".")]
    if bad or ids.null_count():
        raise ManifestError(
            path,
            f"has study_ids that cannot name a file: {bad[:5] or ['<empty>']}",
            "use non-empty ids without slashes or a leading dot",
        )
    duplicated = ids.filter(ids.is_duplicated()).unique().to_list()
    if duplicated:
        raise ManifestError(
            path, f"lists study_ids more than once: {sorted(duplicated)[:5]}", "give every study its own id"
        )
    if frame["image_path"].null_count():
        raise ManifestError(path, "has rows without image_path", "fill image_path for every study")
    base = path.resolve().parent

    def resolve(column: str) -> pl.Expr:
        return pl.col(column).map_elements(lambda p: str(base / p) if p else None, return_dtype=pl.String)

    frame = frame.with_columns(resolve("image_path"))
    if "label_path" in frame.columns:
        frame = frame.with_columns(resolve("label_path"))
    return frame
