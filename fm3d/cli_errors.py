"""How every `fm3d` command reports a user's mistake: one line on stderr, the nearest valid name, exit 2.

A typo should cost one glance, not a scroll through a usage dump or a traceback: the line names
what was wrong (the option, key, file or column) and, where a close valid one exists, suggests it.
Light on imports on purpose: the `fm3d` dispatcher uses it before any application is loaded.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from pathlib import Path

USAGE_ERROR = 2


def nearest(word: str, known: Iterable[str]) -> str | None:
    """The known name closest to `word` (difflib), or None when nothing is close."""
    close = difflib.get_close_matches(word, sorted(set(known)), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, known: Iterable[str], quote: str = "") -> str:
    """`" (did you mean X?)"` for the known name closest to `word`, else ""."""
    match = nearest(word, known)
    return f" (did you mean {quote}{match}{quote}?)" if match else ""


def nearest_file(path: str | Path) -> str | None:
    """A file beside the missing `path` whose name is closest to it (e.g. demo.yaml for dmeo.yaml)."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    siblings = {entry.name: entry for entry in path.parent.iterdir() if entry.is_file()}
    match = nearest(path.name, siblings)
    return str(path.parent / match) if match else None


def one_line(message: str) -> str:
    """`message` with its line breaks and indentation collapsed to single spaces."""
    return " ".join(message.split())


def report(prog: str, message: str) -> int:
    """Print `<prog>: <message>` as one line on stderr; returns the usage-error exit status (2)."""
    print(f"{prog}: {one_line(message)}", file=sys.stderr)
    return USAGE_ERROR
