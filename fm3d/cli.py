"""The `fm3d` command: dispatches `fm3d <command> ...` to the entry point registered for it.

Every command, the library's own included, is an entry point of the group `fm3d.commands`
(`name = "module:main"`, where `main(argv: list[str]) -> int | None`). The applications
(`pretrain`, `downstream`, `ehr`) mount themselves there, so `fm3d` never imports them.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

COMMAND_GROUP = "fm3d.commands"


def available_commands() -> dict[str, EntryPoint]:
    """The installed `fm3d` commands by name."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def _usage(commands: dict[str, EntryPoint]) -> str:
    names = "\n".join(f"  {name}" for name in sorted(commands))
    return (
        "usage: fm3d <command> [args...]\n\n"
        f"commands:\n{names}\n\n"
        "Run `fm3d <command> --help` for a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    """Run one `fm3d` command and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available_commands()
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage(commands))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"fm3d: unknown command {name!r}.\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    command = commands[name].load()
    status = command(rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
