"""The `fm3d` command: dispatches `fm3d <command> ...` to the entry point registered for it.

Every command, the library's own included, is an entry point of the group `fm3d.commands`
(`name = "module:main"`, where `main(argv: list[str]) -> int | None`). The applications
(`pretrain`, `downstream`, `ehr`) mount themselves there, so `fm3d` never imports them.
`fm3d --help` describes each command by the first line of its module's docstring, read from
the source without importing it: listing the commands stays fast, and a broken application
cannot hide the others.
"""

from __future__ import annotations

import argparse
import ast
import sys
from importlib.metadata import EntryPoint, entry_points
from importlib.util import find_spec
from pathlib import Path

from fm3d.cli_errors import did_you_mean, report
from fm3d.errors import Fm3dError

COMMAND_GROUP = "fm3d.commands"


def available_commands() -> dict[str, EntryPoint]:
    """The installed `fm3d` commands by name."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def summary_line(docstring: str | None) -> str:
    """A command module's docstring as one help line: its first line without the "`fm3d x`: " prefix."""
    first = (docstring or "").strip().split("\n", 1)[0].strip()
    if first.startswith("`") and "`: " in first:
        first = first.split("`: ", 1)[1]
    return first[:1].upper() + first[1:]


def command_parser(prog: str, docstring: str) -> argparse.ArgumentParser:
    """The parser of a command module: its docstring's first line as the description and the
    indented examples under it (up to the first blank line) as the epilog, shown as written."""
    summary, examples = docstring.split("\n", 1)
    return argparse.ArgumentParser(
        prog=prog,
        description=summary_line(summary),
        epilog="examples:\n" + examples.strip("\n").split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def describe(command: EntryPoint) -> str:
    """The help line of one command, from its module's source (never imported here)."""
    try:
        spec = find_spec(command.module)
        source = Path(spec.origin).read_text() if spec and spec.origin else ""
        return summary_line(ast.get_docstring(ast.parse(source))) or "(no description)"
    except (ImportError, OSError, SyntaxError, ValueError) as exc:
        return f"(cannot be read: {exc})"


def _usage(commands: dict[str, EntryPoint]) -> str:
    width = max(map(len, commands), default=0) + 2
    lines = "\n".join(f"  {name:<{width}}{describe(commands[name])}" for name in sorted(commands))
    return (
        "usage: fm3d <command> [args...]\n\n"
        f"commands:\n{lines}\n\n"
        "Run `fm3d <command> --help` for a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    """Run one `fm3d` command and return its exit status.

    A deliberate fm3d error (`Fm3dError`) that a command lets through is the user's to fix: it
    is printed as one line, `fm3d <command>: <message>`, with exit status 2, not as a traceback;
    so is an OSError about a file the system refused.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available_commands()
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage(commands))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        hint = did_you_mean(name, commands, quote="'")
        return report("fm3d", f"unknown command {name!r}{hint}; run `fm3d --help` for the commands")
    command = commands[name].load()
    try:
        status = command(rest)
    except Fm3dError as exc:
        return report(f"fm3d {name}", str(exc))
    except OSError as exc:
        # A path the system refused (not a folder, no permission, disk full) is the user's to
        # fix too; an OSError that names no file is not, and keeps its traceback.
        if exc.filename is None:
            raise
        return report(f"fm3d {name}", f"{exc.filename}: {exc.strerror}; check the path and its permissions")
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
