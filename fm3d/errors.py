"""The base of fm3d's input errors: a file, what is wrong with it, and what to do."""

from __future__ import annotations

from pathlib import Path


class PathError(Exception):
    """An input file or folder that cannot be used; the message names it, the problem and the fix.

    Subclasses are the failure families (CT data, EHR); they stay picklable so worker
    processes can hand them back to the parent.
    """

    def __init__(self, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message += f". {hint[0].upper()}{hint[1:]}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.hint))
