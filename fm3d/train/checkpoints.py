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
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LAST = "last"
BEST = "best"


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
    """Which checkpoint is the best one, by what, and from when."""

    path: Path
    monitor: str
    score: float
    epoch: int
    step: int


def best_checkpoint(trainer: pl.Trainer) -> BestInfo | None:
    """The best checkpoint of this fit (file, monitor, score, epoch, step), if one was written."""
    import torch

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, BestCheckpoint) and callback.best_model_path:
            path = Path(callback.best_model_path)
            if not path.is_file():
                return None
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return BestInfo(
                path=path,
                monitor=str(callback.monitor),
                score=float(callback.best_model_score),
                epoch=int(state["epoch"]),
                step=int(state["global_step"]),
            )
    return None
