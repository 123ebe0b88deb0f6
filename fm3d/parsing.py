"""The argument parser of fm3d's LightningCLI commands: a config mistake costs one line, not a usage dump.

jsonargparse answers a typo (`--model.encodr`, a misspelt key in a YAML, `--config missing.yaml`)
with the whole usage (60-80 lines for `fm3d pretrain fit`) and a nested message. `ArgumentParser`
keeps its parsing and prints instead one line naming the option, key or file, the nearest valid
one, and where to look (`fm3d pretrain fit --help`), then exits 2. Pass it to LightningCLI as
`parser_class=ArgumentParser`; `fm3d pretrain` and `fm3d finetune` both do.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any, NoReturn

from jsonargparse import ArgumentParser as JsonArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

from fm3d.cli_errors import USAGE_ERROR, did_you_mean, nearest, nearest_file, one_line

# jsonargparse's wordings of "this key is not one of mine", innermost parser first.
_UNKNOWN_KEY = (
    re.compile(r"Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)", re.DOTALL)
_MISSING_PATH = re.compile(r"(?:File|Directory|Path) does not exist: '(?P<path>[^']+)'")
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":(?P<detail>.*)', re.DOTALL)
_CLASS_PATH = re.compile(r"class_path[= ]'(?P<path>[\w.]+)'")
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)' \(choose from (?P<choices>.*)\)")
# Lines of a nested jsonargparse message that repeat the input or the type instead of the problem.
_NOISE = re.compile(
    r"^(Given value|Subtypes:|Errors:|- Expected a <class 'NoneType'>|Does not validate against any)"
)
_GIVEN = re.compile(r"^\s*Given value: (?P<value>.*)$", re.MULTILINE)


def known_options(parser: JsonArgumentParser) -> list[str]:
    """Every `--long.option` name `parser` accepts, without the dashes (e.g. "model.encoder")."""
    return [s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _class_options(class_path: str) -> list[str]:
    """The init arguments of the class named `class_path` ([] when it cannot be imported)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(target).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _unknown_key(message: str, parser: JsonArgumentParser) -> str | None:
    """The "unknown key K" reading, with the nearest accepted key, of a misspelt config or class key."""
    parser_key = _PARSER_KEY.match(message)
    for pattern in _UNKNOWN_KEY:
        found = pattern.search(message)
        if found is None:
            continue
        key = found["key"]
        if found.groupdict().get("group"):
            key = f"{found['group']}.{key}"
        class_path = _CLASS_PATH.search(message)
        if parser_key and class_path:
            owner = class_path["path"].rpartition(".")[2]
            hint = did_you_mean(key, _class_options(class_path["path"]), quote="'")
            return f"{parser_key['key']}: {owner} has no argument '{key}'{hint}"
        hint = did_you_mean(key, known_options(parser))
        return f"unknown key {key} in the config{hint}"
    return None


def _unrecognized(message: str, parser: JsonArgumentParser) -> str | None:
    """The "unknown option --x (did you mean --y?)" reading of options the parser lacks."""
    found = _UNRECOGNIZED.match(message)
    if found is None:
        return None
    options = [arg.split("=", 1)[0] for arg in found["args"].split() if arg.startswith("--")]
    if not options:
        return f"unexpected arguments: {one_line(found['args'])}"
    known = known_options(parser)
    parts = []
    for option in options:
        close = nearest(option[2:], known)
        parts.append(f"unknown option {option}" + (f" (did you mean --{close}?)" if close else ""))
    return "; ".join(parts)


def _missing_path(message: str) -> str | None:
    found = _MISSING_PATH.search(message)
    if found is None:
        return None
    key = _PARSER_KEY.match(message)
    option = f"--{key['key']} " if key else ""
    close = nearest_file(found["path"])
    hint = f" (did you mean {close}?)" if close else ""
    return f"{option}{found['path']} does not exist{hint}"


def _invalid_choice(message: str) -> str | None:
    found = _INVALID_CHOICE.search(message)
    if found is None:
        return None
    choices = re.findall(r"'([^']*)'", found["choices"])
    return f"{one_line(message)}{did_you_mean(found['word'], choices, quote=chr(39))}"


def explain(message: str, parser: JsonArgumentParser) -> str:
    """One line saying what is wrong in a jsonargparse error `message` and the nearest valid name."""
    for reading in (
        _missing_path(message),
        _unknown_key(message, parser),
        _unrecognized(message, parser),
        _invalid_choice(message),
    ):
        if reading is not None:
            return reading
    parser_key = _PARSER_KEY.match(message)
    if parser_key is None:
        return one_line(message)
    lines = [line.strip() for line in parser_key["detail"].splitlines()]
    detail = " ".join(line.removeprefix("- ") for line in lines if line and not _NOISE.match(line))
    given = _GIVEN.search(parser_key["detail"])
    if given:
        detail += f" (given: {given['value'][:80]})"
    return f"--{parser_key['key']}: {detail}"


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors (see the module docstring); parsing is unchanged."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the one-line reading of `message` and exit 2 (or raise, where jsonargparse would)."""
        if not self.exit_on_error:
            super().error(message, ex)
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        line = explain(message, parser).rstrip(".")
        prog, command = (p.prog.replace(" [options]", "") for p in (self, parser))
        sys.stderr.write(f"{prog}: {line}. See `{command} --help`.\n")
        self.exit(USAGE_ERROR)
