"""`fm3d prepare --convert FORMAT`: rewrite a prepared cache's arrays in another format (in place or a copy).

A study's format is its files' suffix (`fm3d.data.cache_formats`), so converting is per study and
needs neither the manifest nor the raw CTs: each array is read from the cache, written under its
new name (temporary name + rename), and the study's index row (image_file, label_file,
output_stat) is journaled as `fm3d prepare` journals it (`fm3d.data.journal`). Only then is the
old file removed (in place). A killed conversion resumes: a study whose journaled files are
already in the target format and intact is skipped, and a re-run of `fm3d prepare` with the
manifest finds converted studies up to date (same sources, the new files' own size and mtime).

A study whose array cannot be read becomes a failed row (listed in failures.parquet), so a later
`fm3d prepare` into the folder prepares it again from its source.

Why a flag of `fm3d prepare` and not a command of its own: it writes the same cache under the
same lock, journal and index rules, and `fm3d prepare` is where users already point at a cache.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fm3d.data import atomic, journal
from fm3d.data.cache import INDEX_FILE, LABEL_NAMES_FILE, LABELS_DIR, STUDIES_DIR
from fm3d.data.cache_formats import CACHE_FORMATS, SUFFIXES, array_file, array_intact, open_array, save_array
from fm3d.data.errors import CacheError, SettingsError
from fm3d.data.lock import output_lock
from fm3d.data.study import output_stat_of
from fm3d.train.progress import progress as progress_lines

logger = logging.getLogger(__name__)

_OUTPUT_DIRS = (STUDIES_DIR, LABELS_DIR, journal.JOURNAL_DIR)


def convert_cache(
    source: str | Path, cache_format: str, out: str | Path | None = None, *, progress: bool = True
) -> dict[str, int]:
    """Rewrite every prepared study of the cache in `source` in `cache_format`; {converted, skipped, failed}.

    `out` None (or `source`) converts in place; another folder receives a converted copy (index,
    failures, labels.json) and `source` is left as it was. Studies already in `cache_format` are
    skipped in place and copied in that format into a new folder.
    """
    if cache_format not in CACHE_FORMATS:
        raise SettingsError(f"unknown cache format {cache_format!r}; choose one of {list(CACHE_FORMATS)}")
    source = Path(source)
    out = source if out is None else Path(out)
    index_path = source / INDEX_FILE
    if not index_path.is_file():
        raise CacheError(
            source,
            f"has no {INDEX_FILE}, so it is not a prepared cache to convert",
            "pass the folder `fm3d prepare --out` wrote",
        )
    try:
        index = pl.read_parquet(index_path)
    except Exception as exc:  # pyarrow/polars raise several types for a damaged file
        raise CacheError(
            index_path, f"cannot be read as parquet ({exc})", "re-run `fm3d prepare` on it"
        ) from exc
    in_place = out.resolve() == source.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(source), nullcontext() if in_place else output_lock(out):
        for folder in _OUTPUT_DIRS:
            (out / folder).mkdir(exist_ok=True)
        atomic.remove_stale_temporaries(out, list(_OUTPUT_DIRS))
        rows = journal.known_rows(source)  # the index, and the journal of a conversion that was killed
        if not in_place:  # what an earlier, killed conversion into `out` already did
            rows.update({sid: row for sid, row in journal.known_rows(out).items() if sid in rows})
        counts = {"converted": 0, "skipped": 0, "failed": 0}
        bar = progress_lines(total=len(rows), desc="fm3d convert", unit="study", disable=not progress)
        for study_id, row in rows.items():
            if row["status"] == "ok":
                rows[study_id], outcome = _convert_study(row, source, out, cache_format, in_place)
                counts[outcome] += 1
            bar.update()
        bar.close()
        # The index keeps its manifest order and extra columns: they are the "manifest" of the fold.
        extras = index.drop([c for c in journal.INDEX_SCHEMA if c not in ("study_id", "patient_id")])
        journal.write_tables(out, extras, rows)
        if not in_place and (source / LABEL_NAMES_FILE).is_file():
            shutil.copyfile(source / LABEL_NAMES_FILE, out / LABEL_NAMES_FILE)
    return counts


def _convert_study(
    row: dict[str, Any], source: Path, out: Path, cache_format: str, in_place: bool
) -> tuple[dict[str, Any], str]:
    """The study's row after converting its arrays (or finding them converted), and the outcome."""
    names = [n for n in (row["image_file"], row["label_file"]) if n]
    targets = [_renamed(n, cache_format) for n in names]
    shape = tuple(row["shape"])
    if targets == names and _converted(row, out, targets, shape):
        if in_place:
            _remove_other_formats(out, targets)  # a conversion killed before it removed the old file
        return row, "skipped"
    try:
        for name, target in zip(names, targets, strict=True):
            save_array(out / target, np.asarray(open_array(source / name)))
        converted = {
            **row,
            "image_file": targets[0],
            "label_file": targets[1] if len(targets) > 1 else None,
            "output_stat": output_stat_of(out, targets),
        }
        journal.write_entry(out, converted)
    except Exception as exc:  # one unreadable study is recorded as failed, never allowed to stop the run
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("study %s could not be converted: %s", row["study_id"], error)
        failed = {**row, "status": "failed", "error": f"could not be converted to {cache_format}: {error}"}
        journal.write_entry(out, failed)
        return failed, "failed"
    if in_place:
        _remove_other_formats(out, targets)
    return converted, "converted"


def _converted(row: dict[str, Any], out: Path, files: list[str], shape: tuple[int, ...]) -> bool:
    """Whether `out` holds the row's files intact and as the row recorded them (size and mtime)."""
    if not all(array_intact(out / f, shape) for f in files):
        return False
    return row.get("output_stat") == output_stat_of(out, files)


def _renamed(name: str, cache_format: str) -> str:
    """A cache file's relative name in `cache_format` (studies/x.npy -> studies/x.b2nd)."""
    folder, file = name.rsplit("/", 1)
    return array_file(folder, Path(file).stem, cache_format)


def _remove_other_formats(out: Path, files: list[str]) -> None:
    """Delete the same study's files in every other format (what an in-place conversion replaced)."""
    for name in files:
        for suffix in SUFFIXES.values():
            other = (out / name).with_suffix(suffix)
            if other != out / name:
                other.unlink(missing_ok=True)
