"""Checkpoint writing that a kill at any moment cannot corrupt.

Lightning's default `TorchCheckpointIO` writes through an fsspec transaction whose temporary
file lives in the system temp folder; on a cluster that is usually another filesystem than
the run folder, so the final `shutil.move` degrades into truncate-and-copy and a job killed
during it (preemption, time limit, OOM) leaves a truncated `last.ckpt` that cannot be
resumed. Here the temporary file sits beside the target, is fsynced, and `os.replace` swaps
it in: a reader sees either the complete old file or the complete new one.

A checkpoint damaged elsewhere (a copy cut short, a full disk on another tool's write) is
refused at load with `fm3d.io.CheckpointReadError`, one line naming the file and what to do, where
torch would raise a zip-reader traceback from deep inside Lightning's resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fm3d.io import TORCH_READ_ERRORS, unreadable_checkpoint

logger = logging.getLogger(__name__)


def _is_local(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _temp_name(path: Path) -> str:
    return f".{path.name}.tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic (temp file + fsync + `os.replace`).

    Remote URLs (s3://, gs://, ...) keep Lightning's fsspec path: object stores publish an
    object only once its upload completes, which is atomic already.
    """

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Lightning's load; a file torch cannot read is a CheckpointReadError naming it."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except TORCH_READ_ERRORS as error:
            raise unreadable_checkpoint(path, error) from error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint does not take storage_options; "
                "use a custom CheckpointIO plugin for them"
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of an earlier writer that was killed mid-save: never valid, safe to drop.
        for stale in target.parent.glob(_temp_name(target) + "*"):
            stale.unlink(missing_ok=True)
        temp = target.with_name(f"{_temp_name(target)}{os.getpid()}")
        try:
            with open(temp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)
        logger.debug("saved checkpoint %s", target)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the directory)."""
    with contextlib.suppress(OSError):  # some filesystems refuse to open directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
