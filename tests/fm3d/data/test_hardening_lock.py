"""Issue 16, class 6: one `fm3d prepare` at a time writes into an output folder.

The choice is to refuse, not wait: a second run into a locked `--out` exits 2 at once naming
the folder and the run holding it, and touches nothing there (not the first run's temporaries,
not its journal). The lock is a kernel file lock, so a killed holder releases it (the
SIGKILL-and-resume test in test_prepare.py re-runs into the same folder).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl

from fm3d.data.cache import PreparedCache
from fm3d.data.lock import output_lock


def _manifest(tmp_path: Path, ct_file: Path, n: int) -> Path:
    manifest = tmp_path / "m.csv"
    pl.DataFrame({"study_id": [f"s{i}" for i in range(n)], "image_path": [str(ct_file)] * n}).write_csv(
        manifest
    )
    return manifest


def test_a_second_run_refuses_and_touches_nothing(tmp_path: Path, ct_file: Path, prepare_cli) -> None:
    manifest = _manifest(tmp_path, ct_file, 2)
    out = tmp_path / "cache"
    (out / "studies").mkdir(parents=True)
    (out / ".journal").mkdir()
    temporary = out / "studies" / ".s0.npy.tmp-4242"  # the first run is writing s0
    temporary.write_bytes(b"half of s0")
    entry = out / ".journal" / "s9.json"
    entry.write_text('{"study_id": "s9"}')
    with output_lock(out):
        run = prepare_cli("--manifest", manifest, "--out", out)
        assert run.returncode == 2, run.stdout
        assert run.stderr == (
            f"fm3d prepare: {out}: is being written by another fm3d prepare (pid {os.getpid()} on "
            f"{socket.gethostname()}, since {run.stderr.split('since ')[1].split(')')[0]}). Wait for that "
            "run to finish and re-run (it resumes), or prepare into another --out\n"
        )
        assert temporary.read_bytes() == b"half of s0" and entry.is_file()
        assert not (out / "index.parquet").exists() and not list((out / "studies").glob("*.npy"))
    run = prepare_cli("--manifest", manifest, "--out", out)
    assert run.returncode == 0, run.stderr
    assert "2 prepared" in run.stdout and not temporary.exists()


def test_two_runs_started_together(tmp_path: Path, ct_file: Path) -> None:
    """Whichever takes the lock prepares everything; the other refuses (or, if later, finds it all done)."""
    manifest = _manifest(tmp_path, ct_file, 4)
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "fm3d.cli", "prepare", "--manifest", str(manifest), "--out", str(out),
               "--spacing", "1.5", "1", "1", "--no-progress"]  # fmt: skip
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, stdout, stderr in results:
        if code == 2:
            assert f"{out}: is being written by another fm3d prepare" in stderr
        else:
            assert "4 prepared, 0 skipped" in stdout or "0 prepared, 4 skipped" in stdout, stdout
    assert PreparedCache(out).study_ids == ["s0", "s1", "s2", "s3"]
    assert not list(out.rglob("*.tmp-*")) and not list((out / ".journal").iterdir())
