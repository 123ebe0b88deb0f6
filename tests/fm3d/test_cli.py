"""The installed `fm3d` console command, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FM3D = Path(sys.executable).with_name("fm3d")


def test_fm3d_info_runs_through_the_console_command():
    result = subprocess.run([str(FM3D), "info"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "attention" in result.stdout
    assert "cpu" in result.stdout and "auto: float32 -> sdpa" in result.stdout


def test_unknown_command_fails_with_usage():
    result = subprocess.run([str(FM3D), "no-such-command"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "info" in result.stderr
