"""The journal of a `fm3d prepare` run and its folding into `index.parquet` and `failures.parquet`.

A study counts as done once `.journal/<study_id>.json` exists (written atomically after its
arrays), so a killed run resumes where it stopped. At the end of a run the journal is folded
into the index and removed. Anything unreadable here (a damaged index or entry) is logged
and treated as "not done", so re-running always repairs the cache instead of stopping.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from fm3d.data import atomic
from fm3d.data.cache import FAILURES_FILE, INDEX_FILE

logger = logging.getLogger(__name__)

JOURNAL_DIR = ".journal"
INDEX_SCHEMA = {
    "study_id": pl.String,
    "patient_id": pl.String,
    "status": pl.String,
    "image_file": pl.String,
    "label_file": pl.String,
    "shape": pl.List(pl.Int64),
    "spacing": pl.List(pl.Float64),
    "affine": pl.List(pl.Float64),
    "hu_p1": pl.Float64,
    "hu_p50": pl.Float64,
    "hu_p99": pl.Float64,
    "source_path": pl.String,
    "source_hash": pl.String,
    "settings": pl.String,
    "record": pl.String,
    "label_path": pl.String,
    "label_hash": pl.String,
    "source_stat": pl.String,
    "output_stat": pl.String,
    "error": pl.String,
}


def write_entry(out: Path, row: dict[str, Any]) -> None:
    """Journal one study's index row (atomically: a reader sees the whole entry or none)."""
    atomic.write_json(out / JOURNAL_DIR / f"{row['study_id']}.json", row)


def known_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Rows recorded so far: the last index, overlaid with journal entries of later work."""
    rows: dict[str, dict[str, Any]] = {}
    index_path = out / INDEX_FILE
    if index_path.is_file():
        try:
            index = pl.read_parquet(index_path)
            keep = [c for c in INDEX_SCHEMA if c in index.columns]
            rows = {r["study_id"]: r for r in index.select(keep).iter_rows(named=True)}
        except Exception as exc:  # polars/pyarrow raise several types for a damaged file
            logger.warning("%s cannot be read (%s); every study will be prepared again", index_path, exc)
    for entry in sorted((out / JOURNAL_DIR).glob("*.json")):
        try:
            row = json.loads(entry.read_text())
            if row["study_id"] != entry.stem:
                raise ValueError(f"it records study {row['study_id']!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the damaged journal entry %s (%s); its study is redone", entry, exc)
            continue
        rows[row["study_id"]] = row
    return rows


def write_tables(out: Path, manifest: pl.DataFrame, rows: dict[str, dict[str, Any]]) -> None:
    """Fold rows into index.parquet (manifest order, extra columns kept) and failures.parquet.

    A manifest study with no row at all (it should not happen) is listed as failed rather than lost.
    """
    ids = manifest["study_id"].to_list()
    # patient_id always comes from the current manifest, also for studies skipped as up to date.
    patients = manifest["patient_id"].to_list() if "patient_id" in manifest.columns else [None] * len(ids)
    missing = {"status": "failed", "error": "no result was recorded for this study; re-run fm3d prepare"}
    core = pl.DataFrame(
        [
            {**{k: rows.get(sid, missing).get(k) for k in INDEX_SCHEMA}, "study_id": sid, "patient_id": pid}
            for sid, pid in zip(ids, patients, strict=True)
        ],
        schema=INDEX_SCHEMA,
    )
    extras = manifest.drop([c for c in ("patient_id", "image_path", "label_path") if c in manifest.columns])
    index = core.join(extras, on="study_id", how="left", maintain_order="left")
    atomic.write_parquet(out / INDEX_FILE, index)
    failures = index.filter(pl.col("status") == "failed").select(
        "study_id", pl.col("source_path").alias("source"), "error"
    )
    atomic.write_parquet(out / FAILURES_FILE, failures)
    for entry in (out / JOURNAL_DIR).glob("*.json"):
        if entry.is_file():  # now in the index; the index was replaced before these go
            entry.unlink()
