"""`fm3d prepare` split over SLURM array tasks: each shard a cache of its own, then one merge.

Shard i of n (`--shard i/n`) prepares the manifest studies whose id hashes to i
(`fm3d.sharding`) into `OUT/shards/<i>-of-<n>/`, a complete prepared cache with its own lock,
journal and index. So every property of a single run holds per task: a killed or failed task is
simply run again and redoes only its own shard's unfinished studies, and two tasks never write
the same file. `--merge` then moves every shard's arrays into `OUT/studies` and `OUT/labels`
(a rename: no copy, and each file keeps the size and mtime its row records, so a later plain
`fm3d prepare` into OUT finds them up to date), folds all rows into one `index.parquet` in
manifest order, exactly as a single run writes it, and removes the shard folders. A merge that
is killed part-way can be run again: it only moves what is still in a shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl

from fm3d.data import atomic, journal
from fm3d.data.cache import INDEX_FILE, LABEL_NAMES_FILE
from fm3d.data.errors import CacheError
from fm3d.data.lock import output_lock
from fm3d.sharding import Shard, complete_split

SHARDS_DIR = "shards"


def shard_folder(out: Path, shard: Shard) -> Path:
    """Where shard `shard` of a cache in `out` is prepared."""
    return out / SHARDS_DIR / shard.name


def shard_manifest(manifest: pl.DataFrame, shard: Shard) -> pl.DataFrame:
    """The manifest rows shard `shard` prepares (all of them for the whole job)."""
    if shard.whole:
        return manifest
    return manifest.filter(pl.Series([shard.owns(sid) for sid in manifest["study_id"]], dtype=pl.Boolean))


def merge_shards(manifest: pl.DataFrame, out: Path, label_names: dict[str, Any] | None) -> dict[str, int]:
    """Fold the finished shards in `out/shards` into `out`; counts {shards, ok, failed}.

    Refuses, naming the shard and what to run, when a shard is missing, unfinished (studies of
    its part of the manifest without a row), being written, or prepared with other settings.
    `label_names` (the manifest's label-name map, if any) is written beside the merged index.
    """
    with output_lock(out):
        shards = complete_split(out / SHARDS_DIR)
        rows: dict[str, dict[str, Any]] = {}
        for shard, folder in shards:
            with output_lock(folder):
                rows.update(_shard_rows(manifest, shard, folder))
        _check_one_setting(rows, out)
        for shard, folder in shards:
            for sid in shard_manifest(manifest, shard)["study_id"]:
                row = rows[sid]
                for name in (row["image_file"], row["label_file"]) if row["status"] == "ok" else ():
                    if name:
                        _move(folder / name, out / name)
        journal.write_tables(out, manifest, {**journal.known_rows(out), **rows})
        if label_names is not None:
            atomic.write_json(out / LABEL_NAMES_FILE, label_names)
        shutil.rmtree(out / SHARDS_DIR)
    failed = sum(row["status"] == "failed" for row in rows.values())
    return {"shards": len(shards), "ok": len(rows) - failed, "failed": failed}


def _shard_rows(manifest: pl.DataFrame, shard: Shard, folder: Path) -> dict[str, dict[str, Any]]:
    """The index rows of a shard, which must cover every study of its part of the manifest."""
    index = folder / INDEX_FILE
    rows = {}
    if index.is_file():
        frame = pl.read_parquet(index)
        rows = {r["study_id"]: r for r in frame.select(list(journal.INDEX_SCHEMA)).iter_rows(named=True)}
    owned = shard_manifest(manifest, shard)["study_id"].to_list()
    unfinished = [sid for sid in owned if sid not in rows]
    if unfinished:
        raise CacheError(
            folder,
            f"has no result for {len(unfinished)} of its {len(owned)} studies (e.g. {unfinished[0]})",
            f"run `fm3d prepare --shard {shard}` again with the same manifest (it resumes), then merge",
        )
    return {sid: rows[sid] for sid in owned}


def _check_one_setting(rows: dict[str, dict[str, Any]], out: Path) -> None:
    """All shards must share spacing and HU window (each row's settings less its own series choice)."""
    seen: dict[str, str] = {}
    for sid, row in rows.items():
        if row["settings"] is None:  # a failed study records none
            continue
        settings = json.loads(row["settings"])
        settings.pop("series_uid", None)
        seen.setdefault(json.dumps(settings, sort_keys=True), sid)
    if len(seen) > 1:
        (first, a), (second, b) = list(seen.items())[:2]
        raise CacheError(
            out / SHARDS_DIR,
            f"holds shards prepared with other settings (study {a}: {first}; study {b}: {second})",
            "prepare every shard with the same --spacing and --hu-window",
        )


def _move(source: Path, target: Path) -> None:
    """Move one array into the cache; one a killed merge already moved is left where it is."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    elif not target.is_file():
        raise CacheError(source, "is missing from its shard", "prepare that shard again, then merge")
