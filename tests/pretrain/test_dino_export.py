"""A DINO run through the CLI exports its EMA teacher, not the student, as the encoder."""

from __future__ import annotations

import torch

import fm3d
from fm3d.cli import main as fm3d_main


def test_a_dino_run_exports_the_teacher(demo_cohort, run_config, tmp_path) -> None:
    config = run_config(
        demo_cohort, tmp_path / "dino.yaml", objectives=("dino",), max_steps=3, limit_val_batches=0
    )
    run_dir = tmp_path / "run"
    argv = ["pretrain", "fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir)]
    assert fm3d_main(argv) == 0
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = fm3d.load_encoder(run_dir / "export" / "encoder").state_dict()
    teacher = "objectives.dino.teacher_encoder."
    moved = 0
    for key, value in exported.items():
        torch.testing.assert_close(value, state[teacher + key], rtol=0, atol=0, msg=key)
        moved += not torch.equal(state[teacher + key], state["encoder." + key])
    assert moved > 0  # after 3 steps the teacher lags the student: the export is not the student
