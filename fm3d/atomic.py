"""Outputs that a kill at any moment cannot leave half-written: temp name beside the target + `os.replace`.

A reader (or a re-run after SIGKILL, a full disk, a second process) sees the complete old file
or the complete new one, never a prefix. The temporary name starts with "." and carries the
writer's pid, so globbing for finished outputs never matches it and two writers never share one.
For a folder written by a library (a Hugging Face `save_pretrained`), `atomic_folder` builds the
whole folder under a temporary name and swaps it in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """The writer-private temporary path beside `path`."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; it replaces `path` only if the block succeeds.

    The file is fsynced before the rename, so a power cut cannot publish an empty file either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_name(path)
    try:
        yield temp
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text)


@contextmanager
def atomic_folder(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to build `directory` in; it takes `directory`'s place if the block succeeds.

    An existing `directory` is moved aside first and deleted after the swap, so the new folder
    never mixes with files of the old one; a failed block, or a swap that fails half-way, leaves
    the old folder in place. (Two renames are not one: a kill between them leaves the old folder
    under `.<name>.old-<pid>`, never deleted.)
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_name(directory)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        moved_aside = directory.exists()
        if moved_aside:
            os.replace(directory, old)
        try:
            os.replace(temp, directory)
        except OSError:
            if moved_aside:
                os.replace(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
