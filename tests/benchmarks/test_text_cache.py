"""benchmarks/text_cache.py --quick: a cache built per long-report mode from real CT-RATE reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_a_row_per_mode(shared_data):
    done = subprocess.run(
        [sys.executable, "benchmarks/text_cache.py", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| long reports")}  # fmt: skip
    assert set(rows) == {"truncate", "chunks"}
    assert all(int(cells[0]) == 48 and float(cells[4]) > 0 for cells in rows.values())  # reports, reports/s
    # Most CT-RATE reports exceed 64 tokens: chunks embeds several inputs per report, truncate one.
    assert float(rows["truncate"][2]) == 1.0 < float(rows["chunks"][2])
