"""Helpers every benchmark script shares: child processes with their own peak RSS, the machine, tables.

Peak memory is only meaningful per process: a case run in the process that already ran
another one inherits its high-water mark. So each candidate runs in a fresh child
(`run_child`), which reports its own timings as one JSON line on stdout; the parent reads the
child's peak resident set size from the kernel (`os.wait4` rusage, which covers the whole
life of that child and nothing else).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


class BenchmarkError(RuntimeError):
    """A benchmark child process that failed; the message carries the command and its stderr tail."""


@dataclass
class ChildResult:
    """What one child process reported (its JSON line), its own peak RSS and its wall time."""

    report: dict[str, Any]
    peak_rss_mib: float
    wall_seconds: float
    stderr_tail: str = ""


def peak_rss_self_mib() -> float:
    """This process's peak RSS so far in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(
    argv: Sequence[str], *, timeout: float | None = None, env: dict[str, str] | None = None
) -> ChildResult:
    """Run `python argv...` in a fresh process; return its last stdout JSON line and its own peak RSS.

    The child is reaped with `os.wait4`, whose rusage is that child's alone (`waitpid`, which
    `subprocess` uses, throws it away). Raises `BenchmarkError` when the child fails, runs
    past `timeout` seconds or prints no JSON line.
    """
    command = [sys.executable, *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env={**os.environ, **(env or {})})
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            if timeout is not None and time.perf_counter() - started > timeout:
                child.kill()
                os.wait4(child.pid, 0)
                child.returncode = -9
                raise BenchmarkError(f"{' '.join(command)} ran past {timeout:.0f} s and was stopped")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # tells Popen the child is reaped
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    if child.returncode != 0:
        raise BenchmarkError(f"{' '.join(command)} exited with {child.returncode}:\n{tail}")
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise BenchmarkError(f"{' '.join(command)} printed no JSON result:\n{tail}")
    return ChildResult(json.loads(lines[-1]), usage.ru_maxrss / 1024, wall, tail)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """CPU model, cores, threads in use, torch version and device: the header of every figure."""
    import torch

    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.cuda.is_available():
        device = f"CUDA {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"
    else:
        device = "CPU only (no CUDA device)"
    return {
        "cpu": cpu,
        "cores": str(cores),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "load average": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
    }


def machine_line() -> str:
    """`machine()` as one sentence for the line under a table."""
    m = machine()
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch threads']} torch threads by default, "
        f"torch {m['torch']}, Python {m['python']}, {m['device']}; load average {m['load average']}."
    )


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None
) -> str:
    """A GitHub markdown table; `numeric` columns are right-aligned."""
    numeric = numeric or [False] * len(headers)
    out = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(out)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values (a candidate that failed in every round)."""
    return statistics.median(values) if values else float("nan")


def matmul_gflops(
    n: int = 4096, *, dtype: str = "float32", device: str = "cpu", seconds: float = 3.0
) -> list[float]:
    """Throughput samples of `torch.mm` on two n x n matrices, GFLOP/s, with the threads in use.

    One untimed call warms the BLAS up; then calls repeat for about `seconds`, each timed
    alone, so the caller can take the median (robust to a busy neighbour) or the best.
    """
    import torch

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        samples.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return samples
