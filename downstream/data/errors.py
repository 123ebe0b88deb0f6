"""The error family of downstream's data modules."""

from __future__ import annotations

from fm3d.errors import Fm3dError


class TaskDataError(Fm3dError, ValueError):
    """A label table or split that does not fit the prepared cache (names the file and the fix)."""
