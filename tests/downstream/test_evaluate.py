"""`fm3d evaluate --help` lists its own options, and with a task config every option of the task."""

from __future__ import annotations

import pytest

from downstream.evaluate import main as evaluate


def test_help_lists_the_options(capsys) -> None:
    assert evaluate(["--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: fm3d evaluate --config")
    for option in (
        "--config",
        "--model.encoder",
        "--ckpt_path",
        "--out",
        "--name",
        "--runs_root",
        "--tracking_uri",
    ):
        assert f"  {option}" in printed


def test_help_with_a_config_lists_the_task_options(cli_kit, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--config", str(cli_kit.conf / "classification.yaml"), "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--model.pos_weight" in printed and "--data.cache_dir" in printed and "--runs_root" in printed


def test_no_arguments_is_a_usage_error(capsys) -> None:
    assert evaluate([]) == 2
    assert "usage: fm3d evaluate" in capsys.readouterr().out
