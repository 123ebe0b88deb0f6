"""benchmarks/cache_formats.py --quick prints both tables, one row per data set and per view and format.

A smoke run: the figures are not asserted (timings vary with the machine), only that every row is there.
"""

from __future__ import annotations


def test_quick_run_prints_bytes_and_speed_per_format(quick_run):
    stdout = quick_run("cache_formats")
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in stdout.splitlines()
        if line.startswith("| ")
    ]
    data = [row[0] for row in rows if row[0] != "data" and len(row) == 6]
    assert data == [
        "real CT at the demo spacing (3, 1.5, 1.5) mm",
        "real CT at 1.5 mm",
        "demo cohort (images + label maps)",
    ]
    speed = [(row[0].split(" (")[0], row[1]) for row in rows if len(row) == 4 and row[0] != "view"]
    formats = [".npy memmap", ".b2nd 32^3", ".b2nd 64^3"]
    views = ["VoCo-v2", "VoCo-v2 region read alone", "multi-crop, defaults", "multi-crop, crops only"]
    assert speed == [(view, f) for view in views for f in formats]
    assert all(row[3] == "1.00x" for row in rows if len(row) == 4 and row[1] == ".npy memmap")
    assert "saved" not in stdout  # --quick never overwrites the docs page
