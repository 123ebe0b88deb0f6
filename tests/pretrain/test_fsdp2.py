"""FSDP2 on two CPU processes (gloo) through `fm3d pretrain fit`: equal to DDP, resumable, exportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import fm3d
from fm3d.train.fsdp import read_checkpoint_state
from fm3d.train.tracking import local_tracking_uri

FM3D = Path(sys.executable).parent / "fm3d"
FSDP2 = {"class_path": "fm3d.train.fsdp.FSDP2Strategy"}
MIX = ("voco", "clip", "phenotype", "tte")

pytestmark = pytest.mark.slow


def _config(
    run_config,
    cohort: dict[str, Path],
    path: Path,
    strategy: object,
    objectives: tuple[str, ...] = MIX,
    **trainer,
) -> Path:
    config = run_config(cohort, path, objectives, devices=2, gradient_clip_val=1.0, **trainer)
    raw = json.loads(config.read_text())
    raw["trainer"]["strategy"] = strategy
    config.write_text(json.dumps(raw))
    return config


def _fit(config: Path, run_dir: Path, *overrides: str) -> None:
    # Lightning's launcher re-runs this command line for rank 1, as it does for users.
    argv = [str(FM3D), "pretrain", "fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir),
            *overrides]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FM3D_RUN_DIR"))}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def _history(run_dir: Path) -> dict[str, list[float]]:
    """Every train/* metric of the run, in step order."""
    client = MlflowClient(tracking_uri=local_tracking_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain/test").experiment_id])
    keys = sorted(key for key in run.data.metrics if key.startswith("train/"))
    return {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in keys
    }


@pytest.mark.parametrize("objectives", [MIX, ("dino", "mae")], ids=["voco-clip-ehr", "dino-mae"])
def test_fsdp2_losses_and_gradient_norms_equal_ddp_for_three_steps(
    objectives: tuple[str, ...], demo_cohort, run_config, tmp_path: Path
) -> None:
    runs = {}
    for name, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        path = tmp_path / f"{name}.yaml"
        config = _config(
            run_config, demo_cohort, path, strategy, objectives, max_steps=3, limit_val_batches=0
        )
        _fit(config, tmp_path / name)
        runs[name] = _history(tmp_path / name)
    ddp, fsdp2 = runs["ddp"], runs["fsdp2"]
    norms = [key for key in ddp if key.startswith("train/grad_norm/")]
    assert {k.rsplit("/", 1)[1] for k in norms} == {"encoder", *objectives}
    assert ddp.keys() == fsdp2.keys()
    for key in [*norms, "train/loss", *(f"train/{name}/loss" for name in objectives)]:
        assert len(ddp[key]) == 3, key
        # Step 1 differs only by the order of float reductions; later steps carry AdamW's updates.
        torch.testing.assert_close(fsdp2[key][0], ddp[key][0], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(fsdp2[key], ddp[key], rtol=1e-4, atol=1e-6, msg=key)
    # Each rank's checkpoint shard holds about half of what DDP's one file holds (weights + AdamW).
    shards = sorted((tmp_path / "fsdp2" / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert len(shards) == 2
    full = (tmp_path / "ddp" / "checkpoints" / "last.ckpt").stat().st_size
    assert all(shard.stat().st_size <= 0.6 * full for shard in shards), [
        s.stat().st_size / full for s in shards
    ]


def test_fsdp2_resumes_from_its_distributed_checkpoint_and_exports_whole_weights(
    demo_cohort, run_config, tmp_path: Path
) -> None:
    config = _config(run_config, demo_cohort, tmp_path / "run.yaml", FSDP2, max_epochs=2, limit_val_batches=1)
    _fit(config, tmp_path / "straight")
    _fit(config, tmp_path / "resumed", "--trainer.max_epochs", "1")
    _fit(config, tmp_path / "resumed", "--ckpt_path", "last")
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert len(straight["train/loss"]) >= 4
    for key in ("train/loss", "train/clip/loss", "train/grad_norm/encoder"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)

    run = tmp_path / "straight"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()
    source = json.loads((run / "export" / "source.json").read_text())
    best = Path(source["checkpoint"])
    assert best.name == "best.ckpt" and best.is_dir()  # validation ran: the export is read from DCP shards
    state = read_checkpoint_state(best)
    encoder = fm3d.load_encoder(run / "export" / "encoder")
    exported = encoder.state_dict()
    assert exported.keys() == {k.removeprefix("encoder.") for k in state if k.startswith("encoder.")}
    for key, value in exported.items():
        assert torch.equal(value, state[f"encoder.{key}"]), key
    assert (run / "export" / "clip").is_dir()
