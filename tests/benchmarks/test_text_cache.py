"""benchmarks/text_cache.py --quick: a cache built per long-report mode from real CT-RATE reports."""

from __future__ import annotations


def test_quick_run_prints_a_row_per_mode(shared_data, quick_run):
    stdout = quick_run("text_cache")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| long reports")}  # fmt: skip
    assert set(rows) == {"truncate", "chunks"}
    assert all(int(cells[0]) == 48 and float(cells[4]) > 0 for cells in rows.values())  # reports, reports/s
    # Most CT-RATE reports exceed 64 tokens: chunks embeds several inputs per report, truncate one.
    assert float(rows["truncate"][2]) == 1.0 < float(rows["chunks"][2])
