"""benchmarks/streaming.py --quick prints the pack-time and read-speed tables, one row per data set and path.

A smoke run: the figures are not asserted (timings vary with the machine), only that every row is there.
"""

from __future__ import annotations


def test_quick_run_prints_pack_time_and_speed_per_path(quick_run):
    stdout = quick_run("streaming")
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| data")
    ]
    packs = [row for row in rows if len(row) == 6]
    speeds = [row for row in rows if len(row) == 5]
    datasets = list(dict.fromkeys(row[0] for row in packs))  # the demo cohort, then the real CT if present
    assert [(row[0], row[1]) for row in packs] == [(d, to) for d in datasets for to in ("local", "memory")]
    paths = [".npy memmap", "pack, local files", "pack, memory://"]
    views = ("image 32 x 96 x 96", "VoCo-v2")
    assert [tuple(row[:3]) for row in speeds] == [(d, v, p) for d in datasets for v in views for p in paths]
    assert all(row[4] == "1.00x" for row in speeds if row[2] == ".npy memmap")
    assert all(float(row[3]) > 0 for row in speeds)
    assert "saved" not in stdout  # --quick never overwrites the docs page
