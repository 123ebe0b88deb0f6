"""Lightning progress as plain lines when stdout is not a terminal (a log file, SLURM, CI, `| tee`).

    fit: step 120/1000 epoch 3 loss 1.234 2.10 it/s ETA 0:07:01

`progress_callbacks` puts `PlainProgressBar` in place of the configured bar (Lightning's TQDM
or Rich bar, which render nothing useful in a file) when stdout is not a terminal, and leaves a
terminal's live bar alone. Used by `fm3d pretrain`, `fm3d finetune` and `fm3d evaluate`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ProgressBar

from fm3d.train.progress import DEFAULT_EVERY_S, count_of, format_duration, is_terminal, rate_and_eta


class PlainProgressBar(ProgressBar):
    """Lightning progress as plain lines: at start, every `every_s` seconds, and at the end of each stage."""

    def __init__(self, every_s: float = DEFAULT_EVERY_S, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every_s = every_s
        self.stream = stream
        self._enabled = True
        self._started = 0.0
        # One clock per loop: validation inside fit must not postpone fit's own next line
        # (with validation every few epochs, a shared clock never let a fit line through).
        self._last_line = {"fit": 0.0, "eval": 0.0}
        self._first_step = 0
        self._batches = 0
        self._eval_started = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _due(self, loop: str) -> bool:
        now = time.monotonic()
        if now - self._last_line[loop] >= self.every_s:
            self._last_line[loop] = now
            return True
        return False

    # ---- fit -------------------------------------------------------------------------------
    def _fit_line(self, trainer: pl.Trainer, prefix: str = "fit") -> str:
        total = trainer.estimated_stepping_batches
        step = trainer.global_step
        text = f"{prefix}: step {count_of(step, total)} epoch {trainer.current_epoch}"
        loss = trainer.progress_bar_metrics.get("train/loss", trainer.callback_metrics.get("train/loss"))
        if loss is not None:
            text += f" loss {float(loss):.4g}"
        elapsed = time.monotonic() - self._started
        return f"{text} {rate_and_eta(step - self._first_step, total - self._first_step, elapsed, 'it')}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last_line["fit"] = time.monotonic()
        self._first_step = trainer.global_step
        resumed = f" (resumed at step {self._first_step})" if self._first_step else ""
        self._print(
            f"fit: start, {count_of(self._first_step, trainer.estimated_stepping_batches)} steps{resumed}"
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._due("fit"):
            self._print(self._fit_line(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = format_duration(time.monotonic() - self._started)
        self._print(f"{self._fit_line(trainer, 'fit: done')} in {elapsed}")

    # ---- validate / test / predict ------------------------------------------------------------
    def _eval_start(self, stage: str, total: float) -> None:
        if self.trainer.sanity_checking:
            return
        self._eval_started = self._last_line["eval"] = time.monotonic()
        self._batches = 0
        self._print(f"{stage}: start, {count_of(0, total)} batches")

    def _eval_batch(self, stage: str, total: float) -> None:
        if self.trainer.sanity_checking:
            return
        self._batches += 1
        if self._due("eval"):
            elapsed = time.monotonic() - self._eval_started
            rate = rate_and_eta(self._batches, total, elapsed, "it")
            self._print(f"{stage}: batch {count_of(self._batches, total)} {rate}")

    def _eval_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        elapsed = format_duration(time.monotonic() - self._eval_started)
        self._print(f"{stage}: done, {self._batches} batches in {elapsed}")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("validate", self.total_val_batches)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._eval_batch("validate", self.total_val_batches)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end("validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("test", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch("test", sum(trainer.num_test_batches))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end("test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("predict", sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch("predict", sum(trainer.num_predict_batches))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end("predict")


def progress_callbacks(
    callbacks: list[Callback], enabled: bool, every_s: float, stream: TextIO | None = None
) -> list[Callback]:
    """`callbacks` with the bar that fits stdout: kept on a terminal, plain lines otherwise.

    With the progress bar switched off (`--trainer.enable_progress_bar false`) nothing changes.
    """
    if not enabled or is_terminal(stream or sys.stdout):
        return callbacks
    kept = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return [*kept, PlainProgressBar(every_s, stream)]
