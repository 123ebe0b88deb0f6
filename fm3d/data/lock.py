"""One writer per prepared cache: an OS file lock on the output folder for the whole run.

Two `fm3d prepare` runs into one `--out` would delete each other's temporaries (a run removes
the ones an interrupted run left) and fold each other's journal. The second run therefore
refuses at once, naming the folder and the run that holds it, instead of waiting an unknown
time: re-running after the first finishes resumes where it stopped. The lock is an fcntl
lock (`filelock`), so the kernel releases it when its holder dies, even by SIGKILL.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from fm3d.data import atomic
from fm3d.data.errors import CacheError

LOCK_FILE = ".prepare.lock"
# Who holds the lock, for the refusal message; a separate file because opening the lock file truncates it.
OWNER_FILE = ".prepare.owner.json"


class OutputLockedError(CacheError):
    """Another process is writing into the same prepared-cache folder."""


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold the write lock on `folder` (which must exist) for the body, or raise `OutputLockedError`."""
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputLockedError(
            folder,
            f"is being written by another fm3d prepare ({_owner(folder)})",
            "wait for that run to finish and re-run (it resumes), or prepare into another --out",
        ) from None
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic.write_json(folder / OWNER_FILE, owner)
        yield
    finally:
        (folder / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def _owner(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock is taken
        return "its process is not recorded yet"
