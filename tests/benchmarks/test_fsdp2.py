"""benchmarks/fsdp2.py --quick: both strategies run on two gloo processes and FSDP2 holds half per rank."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_prints_ddp_and_fsdp2_rows_with_halved_state(quick_run) -> None:
    stdout = quick_run("fsdp2")
    row = r"^\| (vit3d_tiny) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x"
    rows = {match[1]: match for match in re.findall(row, stdout, re.M)}
    assert set(rows) == {"ddp", "fsdp2"}
    # Two ranks: each holds half of every parameter and AdamW moment (plus rounding of odd sizes).
    assert 0.45 <= float(rows["fsdp2"][5]) <= 0.6
    assert float(rows["fsdp2"][2]) == pytest.approx(float(rows["ddp"][2]) / 2, rel=0.05)
