"""benchmarks/text_tower_modes.py --quick: each text tower mode trains a CLIP step in a child process.

A smoke run (no timing asserts): every mode's row is printed, and only LoRA and full train text weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_prints_a_row_per_mode():
    done = subprocess.run(
        [sys.executable, "benchmarks/text_tower_modes.py", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| text tower")}  # fmt: skip
    assert set(rows) == {"frozen", "lora", "full"}
    trainable = {mode: float(cells[0]) for mode, cells in rows.items()}
    assert trainable["frozen"] == 0 < trainable["lora"] < trainable["full"]
    assert all(float(cells[2]) > 0 for cells in rows.values())  # samples/s
