"""benchmarks/text_tower_modes.py --quick: each text tower mode trains a CLIP step in a child process.

A smoke run (no timing asserts): every mode's row is printed, and only LoRA and full train text weights.
"""

from __future__ import annotations


def test_quick_run_prints_a_row_per_mode(quick_run):
    stdout = quick_run("text_tower_modes")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| text tower")}  # fmt: skip
    assert set(rows) == {"frozen", "lora", "full"}
    trainable = {mode: float(cells[0]) for mode, cells in rows.items()}
    assert trainable["frozen"] == 0 < trainable["lora"] < trainable["full"]
    assert all(float(cells[2]) > 0 for cells in rows.values())  # samples/s
