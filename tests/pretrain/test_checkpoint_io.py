"""AtomicCheckpointIO: a process killed in the middle of a checkpoint save leaves the old file intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fm3d.io import CheckpointReadError
from pretrain.checkpoint_io import AtomicCheckpointIO

# The child saves a checkpoint whose pickling blocks forever half-way (after the big tensor),
# after touching a marker file, so the parent can SIGKILL it in the middle of the save.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from pretrain.checkpoint_io import AtomicCheckpointIO

    class Stall:
        def __reduce__(self):
            Path(sys.argv[2]).touch()
            time.sleep(600)
            return (int, (0,))

    checkpoint = {"weights": torch.arange(1_000_000, dtype=torch.float32), "stall": Stall()}
    if sys.argv[3] == "atomic":
        AtomicCheckpointIO().save_checkpoint(checkpoint, sys.argv[1])
    else:
        torch.save(checkpoint, sys.argv[1])  # what a plain in-place write does
    """
)


def _kill_mid_save(target: Path, mode: str, tmp_path: Path) -> None:
    marker = tmp_path / f"stalled-{mode}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target), str(marker), mode])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the saving process ended before it stalled"
            assert time.monotonic() < deadline, "the saving process never reached the middle of the save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()


def _old_checkpoint(path: Path) -> dict:
    checkpoint = {"epoch": 3, "weights": torch.ones(5)}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return checkpoint


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    _old_checkpoint(target)
    _kill_mid_save(target, "atomic", tmp_path)
    loaded = AtomicCheckpointIO().load_checkpoint(target)
    assert loaded["epoch"] == 3
    torch.testing.assert_close(loaded["weights"], torch.ones(5))
    # The killed writer's temporary file is dropped by the next save.
    assert list(target.parent.glob(".last.ckpt.tmp-*"))
    AtomicCheckpointIO().save_checkpoint({"epoch": 4}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(target)["epoch"] == 4


def test_a_plain_in_place_write_is_corrupted_by_the_same_kill(tmp_path: Path) -> None:
    # The reference the test above guards against: torch.save straight onto the target.
    target = tmp_path / "last.ckpt"
    _old_checkpoint(target)
    _kill_mid_save(target, "plain", tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - truncated zip: torch raises RuntimeError/EOFError
        torch.load(target, weights_only=True)


def test_remote_paths_keep_lightnings_fsspec_writer(tmp_path: Path) -> None:
    path = f"memory://{tmp_path.name}/x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(2)}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["a"].shape == (2,)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_checkpoint_is_named_at_load(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    _old_checkpoint(path)
    content = path.read_bytes()
    path.write_bytes(
        {"truncated": content[: len(content) // 2], "empty": b"", "garbage": b"\x80not a zip" * 50}[damage]
    )
    with pytest.raises(
        CheckpointReadError, match=rf"{path}: cannot be read as a checkpoint \(.*\)\. .*--ckpt_path"
    ):
        AtomicCheckpointIO().load_checkpoint(path)


@pytest.mark.slow
def test_resuming_from_a_truncated_last_ckpt_is_one_line_not_a_traceback(demo_cohort, run_config, tmp_path):
    """`fm3d pretrain fit --ckpt_path <truncated>` in a subprocess: exit 2, one line naming the file."""
    config = run_config(
        demo_cohort, tmp_path / "run.yaml", objectives=("phenotype",), max_epochs=1, limit_train_batches=1,
        limit_val_batches=0,
    )  # fmt: skip
    fit = [sys.executable, "-m", "fm3d.cli", "pretrain", "fit", "--config", str(config)]
    first = subprocess.run(
        [*fit, "--trainer.default_root_dir", str(tmp_path / "first")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 3])

    resumed = subprocess.run(
        [*fit, "--trainer.default_root_dir", str(tmp_path / "second"), "--ckpt_path", str(truncated)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("fm3d pretrain")]
    assert lines == [resumed.stderr.strip().splitlines()[-1]] and "Traceback" not in resumed.stderr
    assert lines[0].startswith(f"fm3d pretrain: {truncated}: cannot be read as a checkpoint")
    assert "resume from an intact checkpoint" in lines[0]
