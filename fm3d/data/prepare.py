"""`fm3d prepare`: turn a manifest of raw CTs into a resumable prepared cache.

Each study is read (`fm3d.data.io`), brought to the canonical grid (`fm3d.data.preprocess`)
and written as `studies/<study_id>.npy` (+ `labels/<study_id>.npy`). Every file is written to
a temporary name and renamed into place, and a study counts as done only once its journal
entry (`.journal/<study_id>.json`, itself renamed into place after the arrays) exists, so a
killed run leaves nothing half-written and a re-run continues where it stopped. At the end
the journal is folded into `index.parquet` and `failures.parquet`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from fm3d.data import atomic
from fm3d.data.cache import FAILURES_FILE, INDEX_FILE, LABELS_DIR, STUDIES_DIR
from fm3d.data.errors import ManifestError, VolumeReadError
from fm3d.data.io import read_label, read_volume
from fm3d.data.manifest import load_manifest
from fm3d.data.preprocess import PreprocessSettings, preprocess

logger = logging.getLogger(__name__)

JOURNAL_DIR = ".journal"
_INDEX_SCHEMA = {
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
    "error": pl.String,
}


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


def prepare_cache(
    manifest_path: str | Path,
    out: str | Path,
    *,
    settings: PreprocessSettings | None = None,
    workers: int = 1,
    series_uid_column: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Prepare every study of a manifest into `out`; returns counts {prepared, skipped, failed}."""
    settings = settings or PreprocessSettings()
    out = Path(out)
    manifest = load_manifest(manifest_path, series_uid_column=series_uid_column, reserved=_INDEX_SCHEMA)
    for folder in (out, out / STUDIES_DIR, out / LABELS_DIR, out / JOURNAL_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    removed = atomic.remove_stale_temporaries(out, [STUDIES_DIR, LABELS_DIR, JOURNAL_DIR])
    if removed:
        logger.info("removed %d temporary files left by an interrupted run in %s", removed, out)
    known = _known_rows(out)
    tasks = []
    for row in manifest.iter_rows(named=True):
        task_settings = json.dumps(
            {**settings.to_dict(), "series_uid": row.get("series_uid")}, sort_keys=True
        )
        tasks.append(
            StudyTask(
                row["study_id"],
                row.get("patient_id"),
                row["image_path"],
                row.get("label_path"),
                row.get("series_uid"),
                task_settings,
                known.get(row["study_id"]),
            )
        )

    # Untouched sources (same size and mtime) are skipped here, so a re-run starts no workers.
    pending = [task for task in tasks if not _untouched(task, out)]
    counts = {"prepared": 0, "skipped": len(tasks) - len(pending), "failed": 0}
    bar = tqdm(
        total=len(tasks), initial=counts["skipped"], desc="fm3d prepare", unit="study", disable=not progress
    )
    for row in _run(pending, out, settings, workers):
        outcome = row.pop("outcome")
        counts[outcome] += 1
        if outcome == "failed":
            logger.warning("study %s failed: %s", row["study_id"], row["error"])
        bar.update()
        bar.set_postfix(counts, refresh=False)
    bar.close()
    _write_tables(out, manifest, _known_rows(out))
    return counts


def _run(tasks: list[StudyTask], out: Path, settings: PreprocessSettings, workers: int):
    """Results of `prepare_study` in completion order, from this process or a pool of processes."""
    if workers <= 1 or len(tasks) <= 1:  # a pool costs a fork server and worker start-up
        for task in tasks:
            yield prepare_study(task, out, settings)
        return
    # Not plain fork: a parent that already ran torch (OpenMP threads) can deadlock forked children.
    # A fork server imports the readers once, then forks each worker from that clean process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(workers,))
    with pool:
        futures = [pool.submit(prepare_study, task, out, settings) for task in tasks]
        for future in as_completed(futures):
            yield future.result()


def _init_worker(workers: int) -> None:
    import torch

    # Processes already run in parallel; each interpolating with every core would oversubscribe.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def prepare_study(task: StudyTask, out: Path, settings: PreprocessSettings) -> dict[str, Any]:
    """Prepare one study (or confirm it is up to date) and journal its index row.

    Never raises for a bad study: the error becomes a "failed" row, so one broken file cannot
    stop a run over thousands.
    """
    row: dict[str, Any] = {
        "study_id": task.study_id,
        "patient_id": task.patient_id,
        "source_path": task.image_path,
        "label_path": task.label_path,
        "settings": task.settings,
    }
    try:
        sources = [task.image_path] + ([task.label_path] if task.label_path else [])
        for source in sources:
            if not Path(source).exists():
                raise VolumeReadError(
                    source, "does not exist", "fix the manifest (relative paths resolve against its folder)"
                )
        stat = atomic.stat_fingerprint(sources)
        previous = task.previous
        row["source_stat"] = stat
        row["source_hash"] = atomic.content_hash(task.image_path)
        row["label_hash"] = atomic.content_hash(task.label_path) if task.label_path else None
        if (
            previous
            and previous.get("source_hash") == row["source_hash"]
            and previous.get("label_hash") == row["label_hash"]
            and _up_to_date(previous, task, out)
        ):
            row = {**previous, "source_stat": stat}
            atomic.write_json(out / JOURNAL_DIR / f"{task.study_id}.json", row)
            return {**row, "outcome": "skipped"}
        row.update(_prepare_arrays(task, out, settings))
        row.update(status="ok", error=None)
        outcome = "prepared"
    except Exception as exc:  # any failure of one study is recorded, never allowed to stop the run
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        outcome = "failed"
    atomic.write_json(out / JOURNAL_DIR / f"{task.study_id}.json", row)
    return {**row, "outcome": outcome}


def _untouched(task: StudyTask, out: Path) -> bool:
    """Whether a study's files keep the size and mtime recorded when it was prepared (no hashing needed)."""
    previous = task.previous
    if not previous or not _up_to_date(previous, task, out):
        return False
    try:
        sources = [task.image_path] + ([task.label_path] if task.label_path else [])
        return previous.get("source_stat") == atomic.stat_fingerprint(sources)
    except OSError:  # a source vanished: let prepare_study report it
        return False


def _up_to_date(previous: dict[str, Any], task: StudyTask, out: Path) -> bool:
    return (
        previous.get("status") == "ok"
        and previous.get("settings") == task.settings
        and previous.get("source_path") == task.image_path
        and previous.get("label_path") == task.label_path
        and (out / previous["image_file"]).is_file()
        and (previous.get("label_file") is None or (out / previous["label_file"]).is_file())
    )


def _prepare_arrays(task: StudyTask, out: Path, settings: PreprocessSettings) -> dict[str, Any]:
    volume = read_volume(task.image_path, series_uid=task.series_uid)
    label = read_label(task.label_path) if task.label_path else None
    prepared = preprocess(volume, settings, label=label)
    image_file = f"{STUDIES_DIR}/{task.study_id}.npy"
    atomic.save_npy(out / image_file, prepared.image)
    label_file = None
    if prepared.label is not None:
        label_file = f"{LABELS_DIR}/{task.study_id}.npy"
        atomic.save_npy(out / label_file, prepared.label)
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
    }


def _known_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Rows recorded so far: the last index, overlaid with journal entries of later work."""
    rows: dict[str, dict[str, Any]] = {}
    index_path = out / INDEX_FILE
    if index_path.is_file():
        index = pl.read_parquet(index_path)
        keep = [c for c in _INDEX_SCHEMA if c in index.columns]
        rows = {r["study_id"]: r for r in index.select(keep).iter_rows(named=True)}
    for entry in sorted((out / JOURNAL_DIR).glob("*.json")):
        row = json.loads(entry.read_text())
        rows[row["study_id"]] = row
    return rows


def _write_tables(out: Path, manifest: pl.DataFrame, rows: dict[str, dict[str, Any]]) -> None:
    """Fold the journal into index.parquet (manifest order, extra columns kept) and failures.parquet."""
    ids = manifest["study_id"].to_list()
    # patient_id always comes from the current manifest, also for studies skipped as up to date.
    patients = manifest["patient_id"].to_list() if "patient_id" in manifest.columns else [None] * len(ids)
    core = pl.DataFrame(
        [
            {**{k: rows[sid].get(k) for k in _INDEX_SCHEMA}, "patient_id": pid}
            for sid, pid in zip(ids, patients, strict=True)
        ],
        schema=_INDEX_SCHEMA,
    )
    extras = manifest.drop([c for c in ("patient_id", "image_path", "label_path") if c in manifest.columns])
    index = core.join(extras, on="study_id", how="left", maintain_order="left")
    atomic.write_parquet(out / INDEX_FILE, index)
    failures = index.filter(pl.col("status") == "failed").select(
        "study_id", pl.col("source_path").alias("source"), "error"
    )
    atomic.write_parquet(out / FAILURES_FILE, failures)
    for entry in (out / JOURNAL_DIR).glob("*.json"):
        entry.unlink()  # now in the index; the index was replaced before these go


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fm3d prepare",
        description="Prepare raw CTs (NIfTI, NRRD, DICOM) listed in a manifest into a memory-mappable cache "
        "of int16 [D,H,W] arrays on a RAS grid at a common spacing. Re-running resumes.",
    )
    parser.add_argument(
        "--manifest",
        required=True,
        type=Path,
        help="CSV or parquet with study_id, image_path (+ optional patient_id, label_path, ...)",
    )
    parser.add_argument("--out", required=True, type=Path, help="cache folder (created; reused on re-runs)")
    parser.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        metavar=("D", "H", "W"),
        default=(3.0, 1.5, 1.5),
        help="target voxel spacing in mm, (D, H, W) = (z, y, x) order (default: 3.0 1.5 1.5)",
    )
    parser.add_argument(
        "--hu-window",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        default=(-1000.0, 1000.0),
        help="HU range kept; values outside are clipped (default: -1000 1000)",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument(
        "--series-uid-column",
        default=None,
        help="manifest column with the SeriesInstanceUID to read from DICOM folders of several series",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d prepare`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = PreprocessSettings(tuple(args.spacing), tuple(args.hu_window))
    except ValueError as exc:
        print(f"fm3d prepare: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        counts = prepare_cache(
            args.manifest,
            args.out,
            settings=settings,
            workers=args.workers,
            series_uid_column=args.series_uid_column,
            progress=not args.no_progress,
        )
    except ManifestError as exc:
        print(f"fm3d prepare: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(
        f"fm3d prepare: {counts['prepared']} prepared, {counts['skipped']} skipped (up to date), "
        f"{counts['failed']} failed in {elapsed:.1f} s -> {args.out / INDEX_FILE}"
    )
    if counts["failed"]:
        print(f"fm3d prepare: see {args.out / FAILURES_FILE} for the failed studies and their errors")
    return 0
