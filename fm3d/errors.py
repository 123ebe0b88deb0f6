"""The root of fm3d's errors, and the base of its input errors (a file, what is wrong, what to do)."""

from __future__ import annotations

from pathlib import Path


class Fm3dError(Exception):
    """Every error fm3d raises on purpose derives from this, so a CLI catches one type.

    Concrete families also derive from the builtin they refine (ValueError, RuntimeError, ...),
    so callers that catch those keep working.
    """


class PathError(Fm3dError):
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
