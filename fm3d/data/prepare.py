"""`fm3d prepare`: turn a manifest of raw CTs into a resumable prepared cache.

Each study is read (`fm3d.data.io`), brought to the canonical grid (`fm3d.data.preprocess`)
and written as `studies/<study_id>.npy` (+ `labels/<study_id>.npy`). Every file is written to
a temporary name and renamed into place, and a study counts as done only once its journal
entry (`fm3d.data.journal`, itself renamed into place after the arrays) exists, so a killed run
leaves nothing half-written and a re-run continues where it stopped.

`--format blosc2` writes chunked, compressed `.b2nd` arrays instead (`fm3d.data.cache_formats`),
and `--convert FORMAT` rewrites an existing cache's arrays in another format (`fm3d.data.convert`).

`--shard i/n` prepares one of n disjoint parts of the manifest into a folder of its own and
`--merge` folds the parts into one cache (`fm3d.data.prepare_shards`; slurm/prepare.sbatch runs
the parts as an array job).

One bad study never stops the batch: every per-study step, its journal entry included, runs
inside the study's error handling, and a worker process killed mid-study (the OOM killer)
fails that study only (`fm3d.data.workers`). One run at a time writes into an output folder
(`fm3d.data.lock`). The exit status is 1 when any study failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from fm3d.cli_errors import report
from fm3d.data import atomic, journal
from fm3d.data.cache import (
    FAILURES_FILE,
    INDEX_FILE,
    LABEL_NAMES_FILE,
    LABELS_DIR,
    STUDIES_DIR,
    recorded_settings,
)
from fm3d.data.cache_formats import CACHE_FORMATS, NPY
from fm3d.data.convert import convert_cache
from fm3d.data.errors import CacheError, ManifestError, SettingsError
from fm3d.data.limits import DEFAULT_MAX_ARRAY_BYTES, ReadLimits
from fm3d.data.lock import output_lock
from fm3d.data.manifest import load_manifest
from fm3d.data.prepare_shards import merge_shards, shard_folder, shard_manifest
from fm3d.data.study import StudyTask, failed_row, prepare_study, untouched
from fm3d.data.workers import run_in_processes
from fm3d.errors import Fm3dError
from fm3d.sharding import WHOLE, Shard, parse_shard
from fm3d.spec import InputSpec, InputSpecError
from fm3d.train.progress import progress as progress_lines

logger = logging.getLogger(__name__)

_OUTPUT_DIRS = (STUDIES_DIR, LABELS_DIR, journal.JOURNAL_DIR)


def prepare_cache(
    manifest_path: str | Path,
    out: str | Path,
    *,
    spec: InputSpec | None = None,
    workers: int = 1,
    series_uid_column: str | None = None,
    progress: bool = True,
    limits: ReadLimits | None = None,
    shard: Shard = WHOLE,
    cache_format: str = NPY,
) -> dict[str, int]:
    """Prepare every study of a manifest into `out`; returns counts {prepared, skipped, failed}.

    `cache_format` ("npy" or "blosc2": `fm3d.data.cache_formats`) is the format of the arrays
    this run writes; studies already up to date keep theirs (`convert_cache` converts them).

    With `shard` (i of n), only the studies of that shard, into `out/shards/<i>-of-<n>/`; merge
    the finished shards with `merge_prepared_shards`.

    Raises `OutputLockedError` when another run is writing into `out`, `ManifestError` for an
    unusable manifest and `CacheError` for an `out` that cannot be a folder; study failures are
    counted and listed in failures.parquet instead.
    """
    spec = spec or InputSpec()
    limits = limits or ReadLimits()
    if workers < 1:
        raise SettingsError(f"workers must be at least 1, got {workers}")
    if cache_format not in CACHE_FORMATS:
        raise SettingsError(f"unknown cache format {cache_format!r}; choose one of {list(CACHE_FORMATS)}")
    out = Path(out)
    manifest = load_manifest(
        manifest_path, series_uid_column=series_uid_column, reserved=journal.INDEX_SCHEMA
    )
    label_names = _label_names(Path(manifest_path).parent / LABEL_NAMES_FILE)
    _make_folder(out)
    target = out if shard.whole else shard_folder(out, shard)
    target.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        counts = _prepare_locked(
            shard_manifest(manifest, shard), target, spec, limits, workers, progress, cache_format
        )
        if label_names is not None:
            atomic.write_json(target / LABEL_NAMES_FILE, label_names)
    return counts


def merge_prepared_shards(
    manifest_path: str | Path, out: str | Path, *, series_uid_column: str | None = None
) -> dict[str, int]:
    """Fold the shards `prepare_cache(..., shard=...)` wrote into one cache in `out`; {shards, ok, failed}.

    The result is the cache one unsharded run writes: the same arrays and the same index rows in
    manifest order (each array keeps the mtime its shard gave it).
    """
    manifest = load_manifest(
        manifest_path, series_uid_column=series_uid_column, reserved=journal.INDEX_SCHEMA
    )
    label_names = _label_names(Path(manifest_path).parent / LABEL_NAMES_FILE)
    return merge_shards(manifest, Path(out), label_names)


def _make_folder(out: Path) -> None:
    """Create `out`, or say why it cannot be a cache folder (a file, under a file, not writable)."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == out else f"lies under {blocker}, which is a file"
        raise CacheError(out, f"{where}, so it cannot be a cache folder", "pass a folder path to --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(out, f"cannot be created ({exc.strerror})", "pick a writable --out") from exc


def _prepare_locked(
    manifest: pl.DataFrame,
    out: Path,
    spec: InputSpec,
    limits: ReadLimits,
    workers: int,
    progress: bool,
    cache_format: str,
) -> dict[str, int]:
    for folder in _OUTPUT_DIRS:
        (out / folder).mkdir(exist_ok=True)
    # Safe: the lock says no other run is writing here, so these are leftovers of a killed one.
    removed = atomic.remove_stale_temporaries(out, list(_OUTPUT_DIRS))
    if removed:
        logger.info("removed %d temporary files left by an interrupted run in %s", removed, out)
    known = journal.known_rows(out)
    tasks = []
    for row in manifest.iter_rows(named=True):
        task_settings = json.dumps(
            {**recorded_settings(spec), "series_uid": row.get("series_uid")}, sort_keys=True
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
                cache_format,
            )
        )

    # Untouched sources (same size and mtime) are skipped here, so a re-run starts no workers.
    pending = [task for task in tasks if not untouched(task, out, limits)]
    counts = {"prepared": 0, "skipped": len(tasks) - len(pending), "failed": 0}
    results: dict[str, dict[str, Any]] = {}
    bar = progress_lines(
        total=len(tasks), initial=counts["skipped"], desc="fm3d prepare", unit="study", disable=not progress
    )
    for row in _run(pending, out, spec, limits, workers):
        outcome = row.pop("outcome")
        counts[outcome] += 1
        results[row["study_id"]] = row
        if outcome == "failed":
            logger.warning("study %s failed: %s", row["study_id"], row["error"])
        bar.update()
        bar.set_postfix(counts, refresh=False)
    bar.close()
    journal.write_tables(out, manifest, {**journal.known_rows(out), **results})
    atomic.remove_stale_temporaries(out, list(_OUTPUT_DIRS))  # a worker killed mid-write leaves one
    return counts


def _label_names(source: Path) -> dict[str, Any] | None:
    """The label-name map beside the manifest, which travels with the label maps (tasks name classes by it).

    Read and checked before any work, so a malformed file costs nothing and names itself.
    """
    if not source.exists():
        return None
    try:
        names = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(
            source, f"cannot be read as JSON ({exc})", 'write it as {"1": "liver", ...} or remove it'
        ) from exc
    if not isinstance(names, dict):
        raise ManifestError(
            source,
            f"holds a JSON {type(names).__name__}, not an object of label value -> name",
            'write it as {"1": "liver", ...}',
        )
    return names


def _run(tasks: list[StudyTask], out: Path, spec: InputSpec, limits: ReadLimits, workers: int):
    """Results of `prepare_study` in completion order, from this process or a pool of processes."""
    if workers <= 1 or len(tasks) <= 1:  # a pool costs a fork server and worker start-up
        for task in tasks:
            yield prepare_study(task, out, spec, limits)
        return
    # Not plain fork: a parent that already ran torch (OpenMP threads) can deadlock forked children.
    # A fork server imports the readers once, then forks each worker from that clean process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fm3d.data.study"])
    yield from run_in_processes(
        partial(prepare_study, out=out, spec=spec, limits=limits),
        tasks,
        workers,
        failed=partial(failed_row, out=out),
        context=context,
        initializer=_init_worker,
        initargs=(workers,),
    )


def _init_worker(workers: int) -> None:
    import torch

    # Processes already run in parallel; each interpolating with every core would oversubscribe.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fm3d prepare",
        description="Prepare raw CTs (NIfTI, NRRD, DICOM) listed in a manifest into a memory-mappable cache "
        "of int16 [D,H,W] arrays on a RAS grid at a common spacing. Re-running resumes. Exit status: "
        "0 all studies ready, 1 some studies failed (listed in failures.parquet), 2 usage error "
        "(including another fm3d prepare writing into the same --out).",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="CSV or parquet with study_id, image_path (+ optional patient_id, label_path, ...); "
        "required except with --convert",
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
        "--format",
        choices=CACHE_FORMATS,
        default=NPY,
        dest="cache_format",
        help="array format of the studies this run writes: npy (memory-mapped) or blosc2 (chunked, "
        "zstd-compressed .b2nd, about 0.4x the bytes); prepared studies keep theirs (default: npy)",
    )
    parser.add_argument(
        "--series-uid-column",
        default=None,
        help="manifest column with the SeriesInstanceUID to read from DICOM folders of several series",
    )
    parser.add_argument(
        "--max-gib",
        type=float,
        default=DEFAULT_MAX_ARRAY_BYTES / 2**30,
        help="largest array one study may allocate, in GiB; a header declaring more is refused before "
        f"reading (default: {DEFAULT_MAX_ARRAY_BYTES / 2**30:g})",
    )
    parser.add_argument(
        "--allow-external-data",
        action="store_true",
        help="let a detached NRRD header (.nhdr) read a data file outside its own folder",
    )
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--shard",
        type=parse_shard,
        default=WHOLE,
        metavar="I/N",
        help="prepare only shard I of N (studies split by a hash of study_id) into OUT/shards/; "
        "for SLURM array tasks (slurm/prepare.sbatch)",
    )
    split.add_argument(
        "--merge",
        action="store_true",
        help="fold the finished shards in OUT/shards into OUT (same --manifest as the shards)",
    )
    split.add_argument(
        "--convert",
        choices=CACHE_FORMATS,
        metavar="FORMAT",
        help=f"rewrite the prepared cache's arrays in FORMAT ({', '.join(CACHE_FORMATS)}): in place in OUT, "
        "or from --source into OUT; resumable, no manifest needed",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="with --convert: the cache to convert into OUT (default: OUT itself, in place)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _checked(args: argparse.Namespace) -> tuple[InputSpec, ReadLimits]:
    """The spec and limits the flags ask for, refused (naming the flag) before any file is touched."""
    try:
        spec = InputSpec(target_spacing_mm=tuple(args.spacing), hu_window=tuple(args.hu_window))
    except InputSpecError as exc:
        raise SettingsError(f"--spacing / --hu-window: {exc}") from None
    if args.workers < 1:
        raise SettingsError(f"--workers must be at least 1, got {args.workers}")
    if not (math.isfinite(args.max_gib) and args.max_gib > 0):
        raise SettingsError(f"--max-gib must be a positive number of GiB, got {args.max_gib}")
    limits = ReadLimits(int(args.max_gib * 2**30), allow_external_data=args.allow_external_data)
    return spec, limits


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d prepare`: 0 when every study is ready, 1 when some failed, 2 on usage errors."""
    args = _parser().parse_args(argv)
    if args.convert is None and args.manifest is None:
        return report("fm3d prepare", "--manifest is required (only --convert works without one)")
    if args.source is not None and args.convert is None:
        return report("fm3d prepare", "--source names the cache to convert; add --convert FORMAT")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        if args.convert is not None:
            return _convert(args, start)
        return _merge(args, start) if args.merge else _prepare(args, start)
    except Fm3dError as exc:
        print(f"fm3d prepare: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing the index
        print(f"fm3d prepare: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace, start: float) -> int:
    spec, limits = _checked(args)
    counts = prepare_cache(
        args.manifest,
        args.out,
        spec=spec,
        workers=args.workers,
        series_uid_column=args.series_uid_column,
        progress=not args.no_progress,
        limits=limits,
        shard=args.shard,
        cache_format=args.cache_format,
    )
    folder = args.out if args.shard.whole else shard_folder(args.out, args.shard)
    part = "" if args.shard.whole else f"shard {args.shard}: "
    print(
        f"fm3d prepare: {part}{counts['prepared']} prepared, {counts['skipped']} skipped (up to date), "
        f"{counts['failed']} failed in {time.perf_counter() - start:.1f} s -> {folder / INDEX_FILE}"
    )
    return _failures(counts["failed"], folder)


def _merge(args: argparse.Namespace, start: float) -> int:
    counts = merge_prepared_shards(args.manifest, args.out, series_uid_column=args.series_uid_column)
    print(
        f"fm3d prepare: merged {counts['shards']} shards in {time.perf_counter() - start:.1f} s: "
        f"{counts['ok']} studies ready, {counts['failed']} failed -> {args.out / INDEX_FILE}"
    )
    return _failures(counts["failed"], args.out)


def _convert(args: argparse.Namespace, start: float) -> int:
    source = args.source or args.out
    counts = convert_cache(source, args.convert, args.out, progress=not args.no_progress)
    print(
        f"fm3d prepare: {counts['converted']} studies converted to {args.convert}, {counts['skipped']} "
        f"already {args.convert}, {counts['failed']} failed in {time.perf_counter() - start:.1f} s "
        f"-> {args.out / INDEX_FILE}"
    )
    return _failures(counts["failed"], args.out)


def _failures(failed: int, folder: Path) -> int:
    """Exit status 1, naming where the errors are, when any study failed; else 0."""
    if failed:
        print(
            f"fm3d prepare: {failed} studies failed; see {folder / FAILURES_FILE} for their errors",
            file=sys.stderr,
        )
        return 1
    return 0
