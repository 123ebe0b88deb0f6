"""benchmarks/multicrop_view.py --quick prints one row per setting (a smoke run: no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_every_setting():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "multicrop_view.py"), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "crop + resize",
        "+ fm3d flips/turns/shift",
        "defaults",
        "affine on every crop",
        "torch bias field on every crop",
        "gamma on every crop",
        "blur on every crop",
        "noise on every crop",
        "TorchIO RandomBiasField on every crop (alone)",
    ]
    assert "| crop + resize |" in done.stdout and "1.00x" in done.stdout
