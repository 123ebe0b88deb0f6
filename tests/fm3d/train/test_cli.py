"""The shared run CLI: no Lightning adverts in a run's log, best.ckpt by a declared or given monitor."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from fm3d.train.cli import RunCLI, silence_adverts


def test_lightning_adverts_are_silenced(tmp_path: Path, scripted, caplog) -> None:
    module_cls, loader = scripted
    silence_adverts()
    silence_adverts()  # idempotent: one filter
    caplog.set_level(logging.INFO)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=1, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module_cls([0.0], monitor=None), loader(1), loader(1))
    messages = [record.getMessage() for record in caplog.records]
    assert any("GPU available" in m for m in messages)  # Lightning's own info still shows
    assert not [m for m in messages if "Tip:" in m or "litlogger" in m or "litmodels" in m]


class _RunCLI(RunCLI):
    application = "test"


def test_best_follows_the_module_declared_monitor(tmp_path: Path, scripted) -> None:
    """Through the run CLI: best.ckpt by the module's `checkpoint_monitor()`, named in the summary."""
    module_cls, _ = scripted
    argv = [
        "fit", "--model.scores", "[3.0, 1.0, 2.0]", "--runs_root", str(tmp_path / "runs"),
        "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip
    lowest = _RunCLI(module_cls, args=argv)
    assert torch.load(lowest.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 1
    assert "(val/score 1 at epoch 1, step 4)" in lowest.summary().render()
    assert (tmp_path / "runs" / "test" / "latest").resolve() == lowest.run_dir.resolve()
    highest = _RunCLI(module_cls, args=[*argv, "--model.monitor", "[val/score, max]"])
    assert torch.load(highest.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0
    assert highest.run_dir != lowest.run_dir
    assert (tmp_path / "runs" / "test" / "latest").resolve() == highest.run_dir.resolve()
