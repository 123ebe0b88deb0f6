"""benchmarks/fsdp2.py --quick: both strategies run on two gloo processes and FSDP2 holds half per rank."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_run_prints_ddp_and_fsdp2_rows_with_halved_state() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fsdp2.py"), "--quick"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = r"^\| (vit3d_tiny) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x"
    rows = {match[1]: match for match in re.findall(row, done.stdout, re.M)}
    assert set(rows) == {"ddp", "fsdp2"}
    # Two ranks: each holds half of every parameter and AdamW moment (plus rounding of odd sizes).
    assert 0.45 <= float(rows["fsdp2"][5]) <= 0.6
    assert float(rows["fsdp2"][2]) == pytest.approx(float(rows["ddp"][2]) / 2, rel=0.05)
