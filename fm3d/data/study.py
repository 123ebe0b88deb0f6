"""One study of `fm3d prepare`: prepare it, or confirm that what the cache holds is up to date.

Up to date means the same settings, the same bytes in every source file the study reads
(`fm3d.data.io.source_files`: a detached NRRD's data file, every DICOM file of the series), and
output arrays that are still exactly what was written (header, size, mtime), so a truncated,
replaced or stale array (`.npy` or `.b2nd`: `fm3d.data.cache_formats`) is redone by re-running.
Everything a study does, its journal entry included, is inside its error handling: a bad study
becomes a "failed" row, never an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fm3d.data import atomic, journal
from fm3d.data.cache import LABELS_DIR, STUDIES_DIR
from fm3d.data.cache_formats import NPY, array_file, array_intact, save_array
from fm3d.data.io import read_label, read_volume, source_files
from fm3d.data.limits import ReadLimits
from fm3d.data.preprocess import preprocess
from fm3d.spec import InputSpec


@dataclass(frozen=True)
class StudyTask:
    """One manifest row to prepare, with what a previous run recorded for it (if anything)."""

    study_id: str
    patient_id: str | None
    image_path: str
    label_path: str | None
    series_uid: str | None
    settings: str  # JSON: preprocessing settings + series choice; a change re-prepares the study
    previous: dict[str, Any] | None
    # Of the arrays this run writes; an up-to-date study keeps the format it has (`fm3d prepare --convert`).
    cache_format: str = NPY


def prepare_study(
    task: StudyTask, out: Path, spec: InputSpec, limits: ReadLimits | None = None
) -> dict[str, Any]:
    """Prepare one study (or confirm it is up to date) and journal its index row.

    Never raises for a bad study: the error, including one writing its journal entry, becomes
    a "failed" row, so one broken file cannot stop a run over thousands.
    """
    limits = limits or ReadLimits()
    row = _base_row(task)
    try:
        # Format checks come first: nothing hashes a folder tree that is not a DICOM series.
        image_files = source_files(task.image_path, series_uid=task.series_uid, limits=limits)
        label_files = source_files(task.label_path, limits=limits) if task.label_path else None
        row["source_stat"] = atomic.stat_fingerprint(_watched(task, limits))
        row["source_hash"] = atomic.content_hash(image_files)
        row["label_hash"] = atomic.content_hash(label_files) if label_files else None
        previous = task.previous
        if (
            previous
            and previous.get("source_hash") == row["source_hash"]
            and previous.get("label_hash") == row["label_hash"]
            and _up_to_date(previous, task, out)
        ):
            output_stat = output_stat_of(out, _outputs(previous))  # recorded afresh for rows that lack it
            row, outcome = (
                {**previous, "source_stat": row["source_stat"], "output_stat": output_stat},
                "skipped",
            )
        else:
            row.update(_prepare_arrays(task, out, spec, limits))
            row.update(status="ok", error=None)
            outcome = "prepared"
    except Exception as exc:  # any failure of one study is recorded, never allowed to stop the run
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        outcome = "failed"
    return _journaled(out, row, outcome)


def _base_row(task: StudyTask) -> dict[str, Any]:
    return {
        "study_id": task.study_id,
        "patient_id": task.patient_id,
        "source_path": task.image_path,
        "label_path": task.label_path,
        "settings": task.settings,
    }


def _journaled(out: Path, row: dict[str, Any], outcome: str) -> dict[str, Any]:
    """Journal the row; a study whose entry cannot be written (disk full, ...) is failed, not fatal."""
    try:
        journal.write_entry(out, row)
    except Exception as exc:
        error = f"its journal entry could not be written ({type(exc).__name__}: {exc})"
        row = {**row, "status": "failed", "error": f"{row['error']}; {error}" if row.get("error") else error}
        outcome = "failed"
    return {**row, "outcome": outcome}


def failed_row(task: StudyTask, reason: str, out: Path) -> dict[str, Any]:
    """The row of a study whose worker died or whose call raised outside `prepare_study`'s handling."""
    row = {**_base_row(task), "status": "failed", "error": f"WorkerDied: {reason}"}
    return _journaled(out, row, "failed")


def _watched(task: StudyTask, limits: ReadLimits) -> list[Path]:
    """Files whose size and mtime decide "untouched": every file a study reads (a DICOM folder: all of it)."""
    paths = []
    for source in (task.image_path, task.label_path):
        if source:
            paths += [Path(source)] if Path(source).is_dir() else source_files(source, limits=limits)
    return paths


def untouched(task: StudyTask, out: Path, limits: ReadLimits) -> bool:
    """Whether a study's files keep the size and mtime recorded when it was prepared (no hashing needed)."""
    previous = task.previous
    try:
        # A row without output_stat (a cache from before it was recorded) goes through
        # prepare_study once: hashed, not re-prepared, and its output_stat recorded.
        if not previous or previous.get("output_stat") is None or not _up_to_date(previous, task, out):
            return False
        return previous.get("source_stat") == atomic.stat_fingerprint(_watched(task, limits))
    except Exception:  # a source vanished or changed format: let prepare_study report it
        return False


def _up_to_date(previous: dict[str, Any], task: StudyTask, out: Path) -> bool:
    """Same settings and sources as recorded, and outputs that are still exactly what was written."""
    return (
        previous.get("status") == "ok"
        and previous.get("settings") == task.settings
        and previous.get("source_path") == task.image_path
        and previous.get("label_path") == task.label_path
        and all(array_intact(out / f, tuple(previous["shape"])) for f in _outputs(previous))
        and previous.get("output_stat") in (None, output_stat_of(out, _outputs(previous)))
    )


def _outputs(row: dict[str, Any]) -> list[str]:
    return [row["image_file"]] + ([row["label_file"]] if row.get("label_file") else [])


def output_stat_of(out: Path, files: list[str]) -> str:
    """Size and mtime of the written arrays (relative names, so a moved cache stays valid)."""
    stats = [(f, (out / f).stat()) for f in files]
    return json.dumps([[f, st.st_size, st.st_mtime_ns] for f, st in stats])


def _prepare_arrays(task: StudyTask, out: Path, spec: InputSpec, limits: ReadLimits) -> dict[str, Any]:
    volume = read_volume(task.image_path, series_uid=task.series_uid, limits=limits)
    label = read_label(task.label_path, limits=limits) if task.label_path else None
    prepared = preprocess(volume, spec, label=label, limits=limits)
    image_file = array_file(STUDIES_DIR, task.study_id, task.cache_format)
    save_array(out / image_file, prepared.image)
    label_file = None
    if prepared.label is not None:
        label_file = array_file(LABELS_DIR, task.study_id, task.cache_format)
        save_array(out / label_file, prepared.label)
    _remove_replaced(out, task.previous, [image_file, label_file])
    p1, p50, p99 = np.percentile(prepared.image, [1, 50, 99])
    record = prepared.record
    return {
        "image_file": image_file,
        "label_file": label_file,
        "shape": list(record.shape),
        "spacing": list(record.spacing),
        "affine": list(record.affine),
        "hu_p1": float(p1),
        "hu_p50": float(p50),
        "hu_p99": float(p99),
        "record": record.to_json(),
        "output_stat": output_stat_of(out, [image_file] + ([label_file] if label_file else [])),
    }


def _remove_replaced(out: Path, previous: dict[str, Any] | None, written: list[str | None]) -> None:
    """Delete the arrays of an earlier run that this one replaced under another name (another format).

    Before the journal entry: a kill in between leaves a row naming a missing file, which the
    next run finds not up to date and prepares again.
    """
    previous = previous or {}
    for name in (previous.get("image_file"), previous.get("label_file")):
        if name and name not in written:
            (out / name).unlink(missing_ok=True)
