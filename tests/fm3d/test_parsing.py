"""fm3d.parsing: jsonargparse's errors read as one line naming the option, key or file and the nearest one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fm3d.parsing import ArgumentParser, explain, known_options


@dataclass
class Optimizer:
    """A class-typed option, as LightningCLI nests them."""

    lr: float = 1e-3
    weight_decay: float = 0.0


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="fm3d demo", exit_on_error=True)
    parser.add_argument("--config", action="config")
    parser.add_argument("--model.encoder", type=str, default="vit3d_tiny")
    parser.add_argument("--model.optimizer", type=Optimizer | None, default=None)
    parser.add_argument("--trainer.max_epochs", type=int, default=1)
    return parser


def _error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_option_names_the_nearest(capsys):
    line = _error(capsys, ["--model.encodr", "x"])
    assert line == (
        "fm3d demo: unknown option --model.encodr (did you mean --model.encoder?). See `fm3d demo --help`."
    )


def test_unknown_key_in_a_yaml_names_the_nearest(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_epoch: 3\n")
    line = _error(capsys, ["--config", str(config)])
    assert "unknown key trainer.max_epoch in the config (did you mean trainer.max_epochs?)" in line


def test_unknown_field_of_a_class_names_the_class_and_nearest_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  optimizer:\n    lr: 0.1\n    weight_decy: 0.05\n")
    line = _error(capsys, ["--config", str(config)])
    assert "model.optimizer: Optimizer has no argument 'weight_decy' (did you mean 'weight_decay'?)" in line


def test_missing_config_names_the_file_and_a_close_sibling(tmp_path, capsys):
    (tmp_path / "demo.yaml").write_text("trainer:\n  max_epochs: 3\n")
    line = _error(capsys, ["--config", str(tmp_path / "dmeo.yaml")])
    assert (
        f"--config {tmp_path / 'dmeo.yaml'} does not exist (did you mean {tmp_path / 'demo.yaml'}?)" in line
    )


def test_wrong_type_names_the_key_and_the_given_value(capsys):
    line = _error(capsys, ["--trainer.max_epochs", "abc"])
    assert "--trainer.max_epochs: Expected a <class 'int'>" in line and "abc" in line


def test_parsing_is_unchanged_when_nothing_is_wrong():
    config = _parser().parse_args(["--model.encoder", "swin3d_tiny", "--trainer.max_epochs", "4"])
    assert config.model.encoder == "swin3d_tiny" and config.trainer.max_epochs == 4
    assert {"model.encoder", "trainer.max_epochs"} <= set(known_options(_parser()))


def test_a_message_it_does_not_know_is_kept_on_one_line():
    assert explain("something\n  went   wrong", _parser()) == "something went wrong"
