"""The benchmark runner: `python -m benchmarks --quick` writes one docs file with the machine and every table.

Smoke runs only (no timing asserts): the structure of what is written is checked, not the figures.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *names: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", *names, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out.read_text()


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert re.fullmatch(r"\|(-{3,}:?\|)+", lines[start + 1]), lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_list_names_every_script_with_the_limit_first():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"], cwd=REPO, capture_output=True, text=True, check=True
    )
    names = [line.split(":", 1)[0] for line in done.stdout.splitlines()]
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert names[0] == "matmul_limit" and sorted(names) == scripts


def test_unknown_name_is_refused_with_the_choices(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nope", "--out", str(tmp_path / "b.md")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "no benchmark named nope" in done.stderr and "matmul_limit" in done.stderr
    assert not (tmp_path / "b.md").exists()


def test_quick_matmul_limit_writes_machine_summary_and_table(tmp_path):
    done, text = _run(tmp_path, "matmul_limit")
    assert text.startswith("# fm3d benchmarks\n")
    machine = dict(_table_rows(text, "| machine |"))
    assert set(machine) >= {"cpu", "cores", "torch threads", "torch", "device", "load average"}
    assert machine["cores"].isdigit() and machine["torch"].split("+")[0].replace(".", "").isdigit()
    assert _table_rows(text, "| script |") == [
        ["[matmul_limit](#matmul_limit)", _first_doc_line("matmul_limit"), "ok", _seconds_cell(text)]
    ]
    assert "\n## matmul_limit\n" in text and "`python benchmarks/matmul_limit.py --quick`" in text
    limit = _table_rows(text, "| device | dtype |")
    assert [row[0] for row in limit] and all(row[0] == "cpu" and float(row[4]) > 0 for row in limit)
    assert "| device |" in done.stdout  # the tables are also printed as they come


def _first_doc_line(name: str) -> str:
    import ast

    return ast.get_docstring(ast.parse((REPO / "benchmarks" / f"{name}.py").read_text())).splitlines()[0]


def _seconds_cell(text: str) -> str:
    return _table_rows(text, "| script |")[0][3]


@pytest.mark.slow
def test_quick_encoder_step_and_attention_entry(tmp_path):
    # Slow: ~12 child processes that each import torch (and MONAI) on a busy 2-core machine.
    _, text = _run(tmp_path, "encoder_step", "attention_entry")
    summary = _table_rows(text, "| script |")
    assert [(row[0].split("]")[0][1:], row[2]) for row in summary] == [
        ("attention_entry", "ok"),
        ("encoder_step", "ok"),
    ]
    steps = _table_rows(text, "| candidate |")
    assert [row[0] for row in steps] == ["fm3d", "fm3d + ckpt", "MONAI", "MONAI flash"]
    for row in steps:
        assert float(row[3]) > 0 and row[6].endswith("%") and float(row[8].replace(",", "")) > 0
    assert steps[2][10] == "1.00x" and steps[2][11] == "1.00x"  # MONAI is the reference of the ratios
    entry = _table_rows(text, "| pass |")
    assert [(row[0], row[1]) for row in entry] == [
        ("fwd", "256"),
        ("fwd", "512"),
        ("fwd+bwd", "256"),
        ("fwd+bwd", "512"),
    ]
    # Time ratios always exist; at N = 256 a case's peak extra memory can round to 0 MiB, so
    # the memory ratio may be blank or 0 there: check the measured columns instead.
    assert all(float(row[5]) > 0 for row in entry)
    assert all(int(value) >= 0 for row in entry for value in row[6:9])


def test_script_headings_nest_under_the_runner_section(monkeypatch):
    """A script's own `# Title` becomes `### Title` under `## name`; code fences keep their lines."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.__main__ import nest_headings

    text = "# Data loading\n\n## detail\n\n```\n# a comment\n```\n#hashtag | 1 |"
    assert nest_headings(text) == "### Data loading\n\n#### detail\n\n```\n# a comment\n```\n#hashtag | 1 |"
