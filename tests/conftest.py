"""Shared fixtures: the real data folder beside the checkout, and the local SLURM cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
LOCAL_SLURM = REPO_ROOT.parent / "shared" / "tools" / "local-slurm.sh"
MUNGE_RUN = Path("/run/munge")
SLURM_LOGS = (Path("/var/log/slurm/slurmctld.log"), Path("/var/log/slurm/slurmd.log"))
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real public CT, reports and EHR); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/README.md)")
    return SHARED_DATA


class SlurmJobs:
    """Submit slurm/*.sbatch scripts to the local cluster and follow their jobs through `scontrol`."""

    def submit(self, script: str, sbatch_options: list[str], cwd: Path, *script_args: str) -> str:
        """`sbatch` the repository's `slurm/<script>` from `cwd` (so `fm3d` is this venv's); the job id."""
        argv = ["sbatch", "--parsable", "--cpus-per-task=1", "--time=20", "--output=job-%j.out"]
        argv += [*sbatch_options, str(REPO_ROOT / "slurm" / script), *script_args]
        fm3d = Path(sys.executable).parent / "fm3d"
        submitted = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "FM3D": str(fm3d)}
        )
        assert submitted.returncode == 0, submitted.stderr
        return submitted.stdout.strip().split(";")[0]

    def state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...)."""
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S+)", shown))

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str, output: Path) -> None:
        """Poll `condition` every 2 s; fail with the job's output when `timeout_s` passes first."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                tail = output.read_text()[-3000:] if output.exists() else "(no output yet)"
                pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; job output:\n{tail}")
            time.sleep(2)

    def wait_finished(self, job: str, timeout_s: float, output: Path) -> str:
        """Wait for the job to end; its final JobState."""
        self.wait(lambda: self.state(job).get("JobState") in FINISHED, timeout_s, "the job to finish", output)
        return self.state(job)["JobState"]

    def preempt_and_release(self, job: str, output: Path) -> None:
        """USR1 the job as SLURM does before a time limit, wait for its requeue and start it at once.

        SLURM holds a requeued job for 120 s before it is eligible again; releasing it
        (`StartTime=now`) changes only the waiting, not what runs.
        """
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        self.wait(lambda: self.state(job).get("Restarts") == "1", 120, "the requeue", output)
        self.wait(
            lambda: self.state(job).get("JobState") == "PENDING", 120, "the requeued job to pend", output
        )
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)


def _clear_stale_munge_socket() -> None:
    """Remove munged's socket when the munged that made it is gone.

    A machine restored from a snapshot keeps /run/munge/munge.socket.2 but not the process;
    local-slurm.sh then takes munged for running, SLURM's authentication is refused, and every
    `sinfo` waits out its timeout (the start took > 5 min and never came up).
    """
    pid_file = MUNGE_RUN / "munged.pid"
    if not pid_file.is_file():
        return
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        for stale in ("munge.socket.2", "munge.socket.2.lock", "munged.pid"):
            (MUNGE_RUN / stale).unlink(missing_ok=True)


def _log_tails() -> str:
    return "\n".join(f"{log}:\n{log.read_text()[-800:]}" for log in SLURM_LOGS if log.is_file())


@pytest.fixture(scope="session")
def slurm() -> SlurmJobs:
    """The local one-node SLURM cluster (`../shared/tools/local-slurm.sh start`); skips when it is absent."""
    if not LOCAL_SLURM.is_file():
        pytest.skip(f"{LOCAL_SLURM} is absent: no local SLURM cluster to test the sbatch scripts on")
    _clear_stale_munge_socket()
    try:
        started = subprocess.run(
            ["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"the local SLURM cluster did not come up within 10 min:\n{_log_tails()}")
    if started.returncode != 0 or shutil.which("sbatch") is None:
        pytest.skip(f"the local SLURM cluster did not start: {started.stderr.strip()[-500:]}\n{_log_tails()}")
    return SlurmJobs()
