"""benchmarks/objectives.py: every step builder runs in-process at tiny sizes; `--quick` prints the table.

Smoke runs only (no timing asserts): the structure and the machine-independent counts are checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fm3d

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture
def objectives(monkeypatch):
    # The scripts import their helpers as a script does (their folder on sys.path).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import objectives

    return objectives


def _case(name: str) -> dict:
    return {"encoder": "vit3d_tiny", "objective": name, "image_size": (32, 32, 64), "batch_size": 2,
            "mask_ratio": 0.75, "threads": 1, "warmup": 1, "steps": 1}  # fmt: skip


def test_every_step_builder_runs_a_counted_step(objectives):
    reports = {name: objectives.run_case(_case(name)) for name in objectives.STEPS}
    assert set(reports) >= {"encoder", "mae"}
    for report in reports.values():
        assert len(report["warmup_seconds"]) == 1 and len(report["seconds"]) == 1
        assert report["flops"] > 0 and report["saved_mib"] > 0 and report["baseline_rss_mib"] > 0
    # MAE trains the encoder and its decoder; the reference trains the encoder alone.
    assert reports["mae"]["params_m"] > reports["encoder"]["params_m"]


def test_mae_step_encodes_a_quarter_of_the_tokens(objectives):
    encoder = fm3d.create_encoder("vit3d_tiny", image_size=(32, 32, 64), patch_size=16, depth=1)
    image = torch.randn(2, 1, 32, 32, 64)  # 2 x 2 x 4 = 16 tokens
    seen = []
    encoder.register_forward_hook(lambda module, args, out: seen.append(out.tokens.shape[1]))
    step = objectives.mae_step(encoder, image, _case("mae"))
    step.loss().backward()
    assert seen == [4]
    assert all(p.grad is not None for module in step.modules for p in module.parameters())


def test_only_the_dino_row_runs_the_teacher_in_its_step(objectives):
    calls = {}
    for name in ("dino", "dino_student"):
        encoder = fm3d.create_encoder("vit3d_tiny", image_size=(32, 32, 64), patch_size=16, depth=1)
        step = objectives.STEPS[name](encoder, torch.randn(2, 1, 32, 32, 64), _case(name))
        teacher = step.modules[1].teacher_encoder
        calls[name] = 0
        teacher.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        step.loss().backward()
    assert calls == {"dino": 1, "dino_student": 0}


@pytest.mark.slow
def test_quick_run_prints_one_row_per_step():
    # Slow: three processes that each import torch.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "objectives.py"), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| encoder | step |"))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2 : start + 7]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("vit3d_tiny", "encoder", "32"),
        ("vit3d_tiny", "mae", "8"),
        ("vit3d_tiny", "multicrop_encoder", "96"),  # 2 global crops of 32 tokens, 8 local of 4
        ("vit3d_tiny", "dino_student", "96"),
        ("vit3d_tiny", "dino", "96"),
    ]
    assert "vit3d_tiny: DINO's teacher forward adds" in done.stdout
    for row in rows:
        assert float(row[4]) > 0 and float(row[7]) > 0 and float(row[8]) > 0
    assert rows[0][11:15] == ["1.00x"] * 4  # the encoder row is the reference of the ratios
    assert all(cell.endswith("x") for cell in rows[1][11:15])
    assert "Machine:" in done.stdout
