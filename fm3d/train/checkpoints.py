"""The two checkpoints of a run: `checkpoints/last.ckpt` always, `checkpoints/best.ckpt` by a monitor.

`last.ckpt` is rewritten at every epoch end and, whatever stopped training (`max_steps` in
the middle of an epoch, a time limit), once more at the end of fit, so a run always leaves
one. `best.ckpt` is kept when the module declares a validation metric to monitor
(`checkpoint_monitor() -> (metric, "min"|"max")`) and validation runs; it is what an export
or an evaluation should use when the last epochs overfit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LAST = "last"
BEST = "best"
DISTRIBUTED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, rewritten (not versioned) at every epoch end and at the end of training."""

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__(dirpath=dirpath, filename=LAST, save_top_k=1, enable_version_counter=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run stopped by max_steps or max_time between epoch ends has unsaved steps.
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, str(Path(self.dirpath) / f"{LAST}{self.FILE_EXTENSION}"))


class BestCheckpoint(ModelCheckpoint):
    """`best.ckpt` by `monitor`, judged after each validation run (never on a train epoch end)."""

    def __init__(self, dirpath: str | Path, monitor: str, mode: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=BEST,
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            enable_version_counter=False,
            save_on_train_epoch_end=False,
            auto_insert_metric_name=False,
        )


def checkpoint_callbacks(run_dir: str | Path, monitor: tuple[str, str] | None) -> list[ModelCheckpoint]:
    """The run's checkpoint callbacks: last always, best when a monitor `(metric, mode)` is declared."""
    dirpath = Path(run_dir) / CHECKPOINTS_DIR
    callbacks: list[ModelCheckpoint] = [LastCheckpoint(dirpath)]
    if monitor is not None:
        callbacks.append(BestCheckpoint(dirpath, *monitor))
    return callbacks


@dataclass(frozen=True)
class BestInfo:
    """Which checkpoint is the best one, and by what; `epoch` and `step` are read from the file."""

    path: Path
    monitor: str
    score: float

    @cached_property
    def _position(self) -> tuple[int, int]:
        import torch

        # A distributed checkpoint (FSDP2) is a folder whose meta.pt holds the loop state.
        source = self.path / DISTRIBUTED_METADATA if self.path.is_dir() else self.path
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["global_step"])

    @property
    def epoch(self) -> int:
        return self._position[0]

    @property
    def step(self) -> int:
        return self._position[1]


def best_checkpoint(trainer: pl.Trainer) -> BestInfo | None:
    """The best checkpoint of this fit (file, monitor, score), if this run wrote one.

    Decided from the callback's state alone, which every rank holds alike: under FSDP the export
    gathers live weights (a collective) when there is no best, so all ranks must take the same
    branch, even where only rank 0 sees the run folder. The file is read only when `epoch` or
    `step` is asked for (rank 0). A fit resumed from another run's checkpoint file restores that
    run's best path but no score: until this run validates, it has no best of its own.
    """
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, BestCheckpoint):
            continue
        if not callback.best_model_path or callback.best_model_score is None:
            return None
        path = Path(callback.best_model_path)
        if path.parent.resolve() != Path(callback.dirpath).resolve():
            return None
        return BestInfo(path=path, monitor=str(callback.monitor), score=float(callback.best_model_score))
    return None
