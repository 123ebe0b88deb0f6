"""The error family of downstream's data modules, a branch of fm3d.data's."""

from __future__ import annotations

from fm3d.data.errors import DataError


class TaskDataError(DataError, ValueError):
    """A label or report table that does not fit the prepared cache (names the file and the fix)."""
