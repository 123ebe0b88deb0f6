"""A two-node run on localhost: `torchrun --nnodes 2 --nproc-per-node 1` launched twice (node ranks 0 and 1).

Lightning's TorchElasticEnvironment reads the ranks torchrun sets; both "nodes" train the
same steps in one DDP world and only global rank 0 writes checkpoints and the export.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fm3d

FM3D = Path(sys.executable).parent / "fm3d"
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_train_one_model(demo_cohort, run_config, tmp_path: Path) -> None:
    config = run_config(
        demo_cohort,
        tmp_path / "run.yaml",
        objectives=("clip", "phenotype"),
        max_steps=3,
        limit_val_batches=0,
        strategy="ddp",
    )
    run_dir = tmp_path / "run"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FM3D_RUN_DIR"))}
    nodes = []
    for node_rank in (0, 1):
        argv = [
            str(TORCHRUN),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node_rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(FM3D),
            "pretrain",
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.num_nodes",
            "2",
            "--trainer.devices",
            "1",
        ]
        log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 - closed below
        nodes.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        codes = [process.wait(timeout=600) for process, _ in nodes]
    finally:
        for process, log in nodes:
            process.kill()
            log.close()
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    # Only global rank 0 prints the summary and writes the export.
    assert "  run folder   " in logs[0] and "run folder" not in logs[1]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert fm3d.load_encoder(run_dir / "export" / "encoder").config.name == "vit3d_tiny"
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["clip", "encoder", "source.json"]
