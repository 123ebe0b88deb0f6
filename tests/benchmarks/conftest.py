"""Fixtures of the benchmark smoke tests: a script's `--quick` run in a child process of its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def quick_run() -> Callable[[str], str]:
    """`quick_run("streaming")` runs `benchmarks/streaming.py --quick` from the repository root and
    returns what it printed; a non-zero exit fails the test with the script's stderr."""

    def run(name: str) -> str:
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick"],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return run
