"""The shared run CLI's quieting of Lightning: no product adverts in a run's log."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

from fm3d.train.cli import silence_adverts


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
