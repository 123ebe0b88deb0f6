"""`fm3d pretrain fit` reading a streaming pack (`fm3d stream pack`) instead of the prepared folder."""

from __future__ import annotations

from pathlib import Path

import torch

from fm3d.cli import main as fm3d_main


def test_pretraining_streams_a_pack_and_checkpoints_its_position(
    demo_cohort, run_config, tmp_path: Path, capsys
) -> None:
    pack = tmp_path / "pack"
    assert fm3d_main(["stream", "pack", str(demo_cohort["cache"]), "--to", str(pack), "--shards", "2",
                      "--no-progress"]) == 0  # fmt: skip
    config = run_config(
        {**demo_cohort, "cache": pack}, tmp_path / "run.yaml", max_steps=3, limit_val_batches=1
    )
    run = tmp_path / "run"
    assert (
        fm3d_main(["pretrain", "fit", "--config", str(config), "--trainer.default_root_dir", str(run)]) == 0
    )
    assert "fm3d pretrain fit: done" in capsys.readouterr().out
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    # The streaming loader's place (epoch, batches consumed) is in the checkpoint, for a mid-epoch resume.
    loader_states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_states and {"epoch", "batches", "world_size"} <= set(loader_states[0])
    assert (run / "export" / "encoder" / "model.safetensors").is_file()
