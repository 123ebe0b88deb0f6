"""Issue 16, class 2: one bad study never stops a `fm3d prepare` batch.

Real runs of the `fm3d prepare` command: study_ids no filesystem can hold are refused up front
naming their rows; a study whose journal entry cannot be written fails alone; a worker process
SIGKILLed mid-study (as the OOM killer does) fails that study while the others finish; the exit
status counts failures; and killing the run leaves no worker process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from fm3d.data.cache import PreparedCache


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children of all its threads, recursively)."""
    found, stack = [], [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def _holds_open(pid: int, target: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(target) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _sparse_nifti(path: Path, shape: tuple[int, int, int]) -> Path:
    """An uncompressed NIfTI of int16 zeros whose body is a hole: large to read, free to write."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_data_offset(352)
    with path.open("wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.truncate(352 + int(np.prod(shape)) * 2)
    return path


@pytest.mark.parametrize(
    ("study_id", "why"),
    [
        ("a\0b", "holds a control character"),
        (".", "starts with a dot"),
        ("..", "starts with a dot"),
        ("CON", "is a reserved device name"),
        ("lpt1.scan", "is a reserved device name"),
        ("x" * 201, "is longer than 200 bytes"),
        ("a/b", "holds a slash"),
        ("", "empty"),
    ],
)
def test_ids_no_filesystem_can_hold_are_refused_naming_the_row(
    tmp_path: Path, ct_file: Path, prepare_main, prepare_cli, study_id: str, why: str
) -> None:
    manifest = tmp_path / "m.parquet"  # parquet: a CSV cannot even carry a NUL byte
    pl.DataFrame({"study_id": ["ok1", study_id], "image_path": [str(ct_file)] * 2}).write_parquet(manifest)
    out = tmp_path / "cache"
    run = (prepare_cli if study_id == "a\0b" else prepare_main)("--manifest", manifest, "--out", out)
    assert run.returncode == 2, run.stdout
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert f"{manifest}: has 1 study_ids that cannot name a file: data row 2 (" in run.stderr
    assert why in run.stderr
    assert not out.exists(), "the manifest is checked before anything is written"


def test_a_journal_entry_that_cannot_be_written_fails_that_study_only(
    tmp_path: Path, ct_file: Path, prepare_cli
) -> None:
    manifest = tmp_path / "m.csv"
    pl.DataFrame({"study_id": ["a", "b", "c"], "image_path": [str(ct_file)] * 3}).write_csv(manifest)
    out = tmp_path / "cache"
    (out / ".journal" / "b.json").mkdir(parents=True)  # a folder where b's entry must go
    run = prepare_cli("--manifest", manifest, "--out", out)
    assert run.returncode == 1, run.stderr
    assert "2 prepared, 0 skipped (up to date), 1 failed" in run.stdout
    assert "1 studies failed; see" in run.stderr and "Traceback" not in run.stderr
    failures = pl.read_parquet(out / "failures.parquet")
    assert failures["study_id"].to_list() == ["b"]
    assert "its journal entry could not be written (IsADirectoryError" in failures["error"][0]
    assert PreparedCache(out).study_ids == ["a", "c"]
    assert not list(out.rglob("*.tmp-*")), "the failed write's temporary is cleaned up"


def test_a_killed_worker_fails_its_study_and_the_pool_goes_on(tmp_path: Path, ct_file: Path) -> None:
    """SIGKILL every worker that opens one study's file (as the OOM killer would), twice."""
    poison = _sparse_nifti(tmp_path / "huge.nii", (1024, 1024, 512))  # 1 GiB to hash: seconds open
    ids = ["a", "b", "poison", "c", "d"]
    paths = [str(ct_file)] * 2 + [str(poison)] + [str(ct_file)] * 2
    pl.DataFrame({"study_id": ids, "image_path": paths}).write_csv(tmp_path / "m.csv")
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "fm3d.cli", "prepare", "--manifest", str(tmp_path / "m.csv"),
               "--out", str(out), "--workers", "2", "--max-gib", "0.5", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []

    def oom_killer() -> None:
        while process.poll() is None:
            for pid in _descendants(process.pid):
                if pid not in killed and _holds_open(pid, poison):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.002)

    watcher = threading.Thread(target=oom_killer, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate(timeout=300)
    watcher.join()
    assert len(killed) == 2, f"the poison study runs once in the pool and once alone: {killed}\n{stderr}"
    assert process.returncode == 1, stderr
    assert "4 prepared, 0 skipped (up to date), 1 failed" in stdout
    assert "1 studies failed" in stderr and "Traceback" not in stderr
    failures = pl.read_parquet(out / "failures.parquet")
    assert failures["study_id"].to_list() == ["poison"]
    assert "worker process died while preparing it" in failures["error"][0]
    assert "out-of-memory killer" in failures["error"][0]
    assert PreparedCache(out).study_ids == ["a", "b", "c", "d"]
    assert not list(out.rglob("*.tmp-*")) and not list((out / ".journal").iterdir())


def test_workers_die_with_the_run(tmp_path: Path, ct_file: Path) -> None:
    n = 12
    pl.DataFrame({"study_id": [f"s{i}" for i in range(n)], "image_path": [str(ct_file)] * n}).write_csv(
        tmp_path / "m.csv"
    )
    command = [sys.executable, "-m", "fm3d.cli", "prepare", "--manifest", str(tmp_path / "m.csv"),
               "--out", str(tmp_path / "cache"), "--workers", "2", "--spacing", "1.5", "1", "1",
               "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and process.poll() is None:
        journal = tmp_path / "cache" / ".journal"
        workers = _descendants(process.pid)
        if len(workers) >= 3 and journal.is_dir() and any(journal.iterdir()):  # fork server + 2 busy workers
            break
        time.sleep(0.05)
    assert process.poll() is None and len(workers) >= 3, "the run should be mid-way with its workers"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the killed run"
