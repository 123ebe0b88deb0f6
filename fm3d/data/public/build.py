"""Run an adapter and write what it found: the manifest, reports, labels, splits, label names, a summary.

The files are those the rest of fm3d reads as they are:

    OUT/manifest.parquet   for `fm3d prepare --manifest`: study_id, patient_id, image_path, split, ...
    OUT/reports.parquet    a report table (data.report_columns: findings, impression, ...)
    OUT/labels.parquet     one boolean column per finding (null: not known), as demo/findings.parquet
    OUT/splits.json        split name -> study ids: the official split, as data.loader.fixed_splits
    OUT/labels.json        label value -> structure name; `fm3d prepare` copies it into the cache
    OUT/summary.json       studies per split, and what was missing, unexpected or left out
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from fm3d.atomic import write_text_atomic
from fm3d.data import atomic
from fm3d.data.cache import LABEL_NAMES_FILE
from fm3d.data.public.registry import SPLIT_NAMES, DatasetLayoutError, DatasetTables, get_adapter

MANIFEST_FILE = "manifest.parquet"
REPORTS_FILE = "reports.parquet"
LABELS_FILE = "labels.parquet"
SPLITS_FILE = "splits.json"
SUMMARY_FILE = "summary.json"


@dataclass
class BuildResult:
    """The tables an adapter produced and the files written from them."""

    tables: DatasetTables
    written: list[Path]


def build_dataset(
    name: str, root: str | Path, out: str | Path, splits: Collection[str] | None = None
) -> BuildResult:
    """Read dataset `name` under `root` with its adapter and write fm3d's tables into `out`.

    splits: fm3d split names to keep (train, val, test, predict); None keeps every study.
    """
    root, out = Path(root), Path(out)
    unknown = sorted(set(splits or ()) - set(SPLIT_NAMES))
    if unknown:
        raise DatasetLayoutError(out, f"unknown split names {unknown}", f"use some of {list(SPLIT_NAMES)}")
    adapter = get_adapter(name)
    if not root.is_dir():
        raise DatasetLayoutError(root, "is not a folder", f"pass the folder holding the {name} download")
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DatasetLayoutError(
            blocker, "is a file, so --out cannot be a folder there", "pick another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    tables = adapter.read(root, out, None if splits is None else set(splits))
    if tables.manifest.is_empty():
        raise DatasetLayoutError(
            root,
            f"holds no usable {name} study ({'; '.join(tables.layout.lines()) or 'nothing found'})",
            "check --root and --split",
        )
    return BuildResult(tables, write_tables(tables, out, name))


def write_tables(tables: DatasetTables, out: Path, name: str) -> list[Path]:
    """Write `tables` into `out` (each file atomically); returns the files written."""
    written = [out / MANIFEST_FILE]
    atomic.write_parquet(out / MANIFEST_FILE, tables.manifest)
    if tables.reports is not None:
        atomic.write_parquet(out / REPORTS_FILE, tables.reports)
        written.append(out / REPORTS_FILE)
    if tables.labels is not None:
        atomic.write_parquet(out / LABELS_FILE, tables.labels)
        written.append(out / LABELS_FILE)
    splits = tables.splits
    if splits:
        atomic.write_json(out / SPLITS_FILE, splits)
        written.append(out / SPLITS_FILE)
    if tables.label_names is not None:
        atomic.write_json(out / LABEL_NAMES_FILE, tables.label_names)
        written.append(out / LABEL_NAMES_FILE)
    summary = {
        "dataset": name,
        "studies": tables.manifest.height,
        "splits": {split: len(ids) for split, ids in splits.items()},
        **tables.layout.as_dict(),
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1))
    written.append(out / SUMMARY_FILE)
    return written
