"""Crash-safe file writes and content fingerprints for the prepared cache.

The writes go through `fm3d.atomic` (temporary name beside the target, fsync, `os.replace`), so
a reader, or a re-run after SIGKILL, sees either the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fm3d.atomic import TEMP_MARK, atomic_path, write_text_atomic

_CHUNK = 1 << 20


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an array as .npy atomically."""
    with atomic_path(path) as temp, temp.open("wb") as f:
        np.save(f, np.ascontiguousarray(array))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON object atomically."""
    write_text_atomic(path, json.dumps(data))


def write_parquet(path: Path, frame: pl.DataFrame) -> None:
    """Write a polars DataFrame as parquet atomically."""
    with atomic_path(path) as temp:
        frame.write_parquet(temp)


def remove_stale_temporaries(root: Path, subfolders: list[str]) -> int:
    """Delete temporary files an interrupted run left in `root` and its subfolders; returns how many."""
    removed = 0
    for folder in [root, *(root / s for s in subfolders)]:
        for tmp in folder.glob(f".*{TEMP_MARK}*"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def files_of(path: Path) -> list[Path]:
    """The file itself, or every file under a folder (sorted, hidden files left out)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def content_hash(files: list[Path]) -> str:
    """BLAKE2b of the bytes of one file, or of several files' names and bytes in the given order.

    The caller lists the files (e.g. `fm3d.data.io.source_files`), so nothing hashes a folder
    tree before its format is known.
    """
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        if len(files) > 1:
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def stat_fingerprint(paths: list[Path]) -> str:
    """Sizes and modification times of files (every file under a folder): a cheap "unchanged" check."""
    entries = []
    for path in paths:
        for file in files_of(Path(path)):
            st = file.stat()
            entries.append([str(file), st.st_size, st.st_mtime_ns])
    return json.dumps(entries)


def npy_intact(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether a .npy file has a readable header for `shape` and exactly the bytes that header promises.

    A truncated file, a file cut inside its header or one replaced by another array fails.
    """
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            header_shape, fortran, dtype = read_header(f)
            data_start = f.tell()
    except (OSError, ValueError, EOFError):
        return False
    expected = data_start + int(np.prod(header_shape, dtype=np.int64)) * dtype.itemsize
    return tuple(header_shape) == tuple(shape) and not fortran and path.stat().st_size == expected
