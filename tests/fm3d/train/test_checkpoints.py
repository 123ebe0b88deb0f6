"""last.ckpt always, best.ckpt by the declared monitor: with a real Trainer and real files."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from fm3d.train.checkpoints import BestCheckpoint, best_checkpoint, checkpoint_callbacks


def _trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_best_is_the_epoch_with_the_lowest_score_and_last_the_final_step(tmp_path: Path, scripted) -> None:
    module_cls, loader = scripted
    module = module_cls([3.0, 1.0, 2.0])
    trainer = _trainer(tmp_path, checkpoint_callbacks(tmp_path, module.checkpoint_monitor()), max_epochs=3)
    trainer.fit(module, loader(4), loader(1))
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (best["epoch"], best["global_step"]) == (1, 8)
    assert last["global_step"] == 12
    info = best_checkpoint(trainer)
    assert (info.monitor, info.score, info.epoch, info.step) == ("val/score", 1.0, 1, 8)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_max_steps_in_the_middle_of_an_epoch_still_writes_last(tmp_path: Path, scripted) -> None:
    module_cls, loader = scripted
    trainer = _trainer(tmp_path, checkpoint_callbacks(tmp_path, None), max_steps=3)
    trainer.fit(module_cls([0.0], monitor=None), loader(10), loader(1))
    assert trainer.global_step == 3  # of an epoch of 10 batches
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    assert best_checkpoint(trainer) is None


def test_no_validation_means_no_best_and_no_warning(tmp_path: Path, scripted, recwarn) -> None:
    module_cls, loader = scripted
    callbacks = checkpoint_callbacks(tmp_path, ("val/score", "min"))
    assert isinstance(callbacks[-1], BestCheckpoint)
    trainer = _trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=0)
    trainer.fit(module_cls([0.0, 0.0]), loader(2), loader(1))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not [w for w in recwarn if "monitored key" in str(w.message)]


def test_a_fit_resumed_from_another_runs_file_has_no_best_until_it_validates(
    tmp_path: Path, scripted
) -> None:
    module_cls, loader = scripted
    first, second = tmp_path / "first", tmp_path / "second"
    trainer = _trainer(first, checkpoint_callbacks(first, ("val/score", "min")), max_epochs=2)
    trainer.fit(module_cls([3.0, 1.0, 2.0]), loader(2), loader(1))
    assert best_checkpoint(trainer).path == first / "checkpoints" / "best.ckpt"
    # A new run folder, resumed from the first run's last.ckpt, ends before its next validation:
    # Lightning restores the first run's best path without its score.
    resumed = _trainer(
        second, checkpoint_callbacks(second, ("val/score", "min")), max_epochs=3, check_val_every_n_epoch=5
    )
    resumed.fit(
        module_cls([3.0, 1.0, 2.0]), loader(2), loader(1), ckpt_path=first / "checkpoints" / "last.ckpt"
    )
    assert resumed.global_step == 6
    assert best_checkpoint(resumed) is None  # not the first run's file (and no float(None))
