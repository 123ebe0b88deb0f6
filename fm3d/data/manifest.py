"""The `fm3d prepare` manifest: one row per study, read from CSV or parquet and checked up front.

Required columns are study_id and image_path; patient_id, label_path and a SeriesInstanceUID
column are optional, and any other column (report text, study_time, ...) is carried into the
index unchanged. Relative paths resolve against the manifest's own folder, so a manifest and
its images can move together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from fm3d.data.errors import ManifestError

# Read as text even when they look numeric: "007" must stay "007", not become 7.
_TEXT_COLUMNS = {"study_id": pl.String, "patient_id": pl.String}
# A study_id names files (studies/<id>.npy, .journal/<id>.json, and their temporaries
# .<id>.npy.tmp-<pid>), which must fit the 255-byte name limit of common filesystems.
MAX_STUDY_ID_BYTES = 200
# Names Windows (and so SMB shares and some sync tools) cannot hold, with or without an extension.
_RESERVED_NAMES = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def load_manifest(
    path: str | Path, *, series_uid_column: str | None = None, reserved: dict[str, Any] | None = None
) -> pl.DataFrame:
    """Read a manifest (CSV or parquet), check it, and resolve paths against its folder.

    Returns study_id, image_path (absolute), and when present patient_id, label_path,
    series_uid (from `series_uid_column`) and every other column unchanged.
    """
    path = Path(path)
    if path.is_dir():
        raise ManifestError(path, "is a folder, not a manifest file", "pass the CSV or parquet file itself")
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
    bad = [(row, sid, why) for row, sid in enumerate(ids.to_list(), 1) if (why := _unusable_id(sid))]
    if bad:
        listed = "; ".join(f"data row {row} ({sid!r}): {why}" for row, sid, why in bad[:5])
        raise ManifestError(
            path,
            f"has {len(bad)} study_ids that cannot name a file: {listed}",
            f"use ids of at most {MAX_STUDY_ID_BYTES} bytes without slashes, control characters, "
            "a leading dot or reserved names (CON, NUL, COM1, ...)",
        )
    duplicated = ids.filter(ids.is_duplicated()).unique().to_list()
    if duplicated:
        raise ManifestError(
            path, f"lists study_ids more than once: {sorted(duplicated)[:5]}", "give every study its own id"
        )
    empty = [row for row, p in enumerate(frame["image_path"].to_list(), 1) if p is None or not p.strip()]
    if empty:
        raise ManifestError(
            path, f"has an empty image_path in data rows {empty[:10]}", "fill image_path for every study"
        )
    base = path.resolve().parent

    def resolve(column: str) -> pl.Expr:
        return pl.col(column).map_elements(lambda p: str(base / p) if p else None, return_dtype=pl.String)

    frame = frame.with_columns(resolve("image_path"))
    if "label_path" in frame.columns:
        frame = frame.with_columns(resolve("label_path"))
    return frame


def _unusable_id(study_id: str | None) -> str | None:
    """Why a study_id cannot be a file name on the cache's filesystem, or None when it can.

    Rows are numbered from 1 for the first data row (the line after a CSV's header).
    """
    if study_id is None or not study_id.strip():
        return "empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in study_id):
        return "holds a control character (NUL, newline, ...)"
    if "/" in study_id or "\\" in study_id:
        return "holds a slash"
    if study_id.startswith("."):
        return "starts with a dot ('.', '..' and hidden names)"
    if _RESERVED_NAMES.match(study_id):
        return "is a reserved device name"
    if len(study_id.encode("utf-8", "surrogatepass")) > MAX_STUDY_ID_BYTES:
        return f"is longer than {MAX_STUDY_ID_BYTES} bytes"
    return None
