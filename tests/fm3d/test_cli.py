"""The installed `fm3d` console command, run as a user would: help, one-line errors, command names in docs."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from fm3d.cli import available_commands, summary_line
from fm3d.cli import main as cli_main

FM3D = Path(sys.executable).with_name("fm3d")
REPO_ROOT = Path(__file__).resolve().parents[2]


def fm3d(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`fm3d ARGS` from the repository root (configs are given relative to it, as in the docs)."""
    return subprocess.run(
        [str(FM3D), *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
    )


def test_fm3d_info_runs_through_the_console_command():
    result = fm3d("info")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "attention" in result.stdout
    assert "cpu" in result.stdout and "auto: float32 -> sdpa" in result.stdout


def test_help_describes_every_command_in_one_line():
    result = fm3d("--help")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert set(lines) == set(available_commands())
    for name, line in lines.items():
        description = line.split(name, 1)[1].strip()
        assert len(description.split()) >= 4 and "cannot be read" not in description, line
    assert "Pretrain" in lines["pretrain"] and "Fine-tune" in lines["finetune"]
    assert "offline" in lines["text-model"] and "offline" in lines["causal-lm"]


def test_summary_line_drops_the_command_prefix():
    assert summary_line("`fm3d info`: what this installation can run.\n\nMore.") == (
        "What this installation can run."
    )
    assert summary_line(None) == ""


def test_unknown_command_is_one_line_with_the_nearest_name():
    result = fm3d("pretrian")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fm3d: unknown command 'pretrian' (did you mean 'pretrain'?); run `fm3d --help` for the commands"
    ]


def test_an_fm3d_error_a_command_lets_through_is_one_line(tmp_path, monkeypatch, capsys):
    # A command module of its own, mounted as an entry point the way applications mount theirs.
    (tmp_path / "fm3d_broken_command.py").write_text(
        "from fm3d.errors import PathError\n"
        "def main(argv):\n"
        "    raise PathError(argv[0], 'is not a table', 'pass a parquet file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    command = EntryPoint(name="broken", value="fm3d_broken_command:main", group="fm3d.commands")
    monkeypatch.setattr("fm3d.cli.available_commands", lambda: {"broken": command})
    assert cli_main(["broken", "x.txt"]) == 2
    assert capsys.readouterr().err == "fm3d broken: x.txt: is not a table. Pass a parquet file\n"


# Every subcommand's --help exits 0 and lists its options (one option of each is checked).
HELP_CASES = [
    (("prepare", "--help"), "--manifest"),
    (("demo-data", "--help"), "--studies"),
    (("info", "--help"), "--json"),
    (("ehr", "labels", "--help"), "--phenotypes"),
    (("ehr", "tasks", "--help"), "--meds"),
    (("pretrain", "fit", "--help"), "--model.encoder"),
    (("finetune", "fit", "--config", "conf/downstream/classification.yaml", "--help"), "--model.encoder"),
    (("evaluate", "--help"), "--ckpt_path"),
    (("text-model", "--help"), "--columns"),
    (("causal-lm", "--help"), "--family"),
]


@pytest.mark.parametrize(("args", "option"), HELP_CASES, ids=[" ".join(a[:-1]) for a, _ in HELP_CASES])
def test_every_command_help_lists_its_options(args, option, capsys, monkeypatch):
    # In-process through the dispatcher (the entry points as installed): a subprocess per case
    # would import torch and Lightning ten times over.
    monkeypatch.chdir(REPO_ROOT)
    try:
        status = cli_main(list(args))
    except SystemExit as exit_:  # argparse and LightningCLI end --help with sys.exit(0)
        status = exit_.code
    out = capsys.readouterr().out
    assert status in (0, None), out[-2000:]
    # An option line of the help (indented, the option first), not only a mention in the usage.
    assert re.search(rf"^\s+{re.escape(option)}\b", out, re.MULTILINE), out[-2000:]
    assert "fm3d fit" not in out


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_path_the_system_refuses_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _one_line_error(fm3d("demo-data", "--out", str(blocker / "demo"), "--studies", "2", "--quiet"))
    assert line.startswith(f"fm3d demo-data: {blocker}")
    assert "Not a directory" in line and "check the path" in line


def test_pretrain_option_typo_is_one_line_naming_the_nearest_option():
    line = _one_line_error(
        fm3d("pretrain", "fit", "--config", "conf/pretrain/demo.yaml", "--model.encodr", "x")
    )
    assert line.startswith("fm3d pretrain fit: unknown option --model.encodr")
    assert "did you mean --model.encoder?" in line and "fm3d pretrain fit --help" in line


def test_finetune_typo_in_a_yaml_is_one_line_naming_the_key(tmp_path):
    config = (REPO_ROOT / "conf" / "downstream" / "classification.yaml").read_text()
    assert "\n  max_epochs:" in config
    typo = tmp_path / "classification.yaml"
    typo.write_text(config.replace("\n  max_epochs:", "\n  max_epoch:"))
    line = _one_line_error(fm3d("finetune", "fit", "--config", str(typo)))
    assert line.startswith("fm3d finetune")
    assert "unknown key trainer.max_epoch in the config (did you mean trainer.max_epochs?)" in line


def test_missing_config_file_is_one_line_naming_the_nearest_file():
    line = _one_line_error(fm3d("pretrain", "fit", "--config", "conf/pretrain/dmeo.yaml"))
    assert "--config" in line and "conf/pretrain/dmeo.yaml does not exist" in line
    assert "did you mean" in line and line.split("did you mean ")[1].startswith(
        str(REPO_ROOT / "conf" / "pretrain" / "demo.yaml")
    )


# Commands as the docs write them: inline (`fm3d x ...`) or at the start of a line in a code block.
_INLINE = re.compile(r"(?<!not )`fm3d ([a-z][a-z0-9-]*)")
_FENCE = re.compile(r"^```.*?$(.*?)^```", re.MULTILINE | re.DOTALL)
_LINE = re.compile(r"^\s*(?:\$ )?fm3d ([a-z][a-z0-9-]*)", re.MULTILINE)


def test_docs_name_only_commands_that_exist():
    commands = set(available_commands())
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    named = {}
    for page in pages:
        text = page.read_text()
        blocks = [n for block in _FENCE.findall(text) for n in _LINE.findall(block)]
        for name in _INLINE.findall(text) + blocks:
            named.setdefault(name, page.relative_to(REPO_ROOT))
    assert {"prepare", "pretrain", "finetune", "evaluate"} <= set(named)
    unknown = {name: str(page) for name, page in named.items() if name not in commands}
    assert not unknown, f"docs name commands that do not exist: {unknown}"
