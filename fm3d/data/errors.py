"""Exceptions of fm3d's CT data path, one class per failure family.

Each names the file, what was wrong and what to do, because the person reading the
message is usually looking at one bad study among thousands.
"""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Base of fm3d's data errors: a file, what is wrong with it, and what to do."""

    def __init__(self, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message += f". {hint[0].upper()}{hint[1:]}"
        super().__init__(message)

    def __reduce__(self):  # keeps the error picklable across worker processes
        return (type(self), (self.path, self.reason, self.hint))


class VolumeReadError(DataError):
    """A CT volume or label map could not be read (format, geometry, modality or voxel values)."""


class CacheError(DataError):
    """A folder is not a usable prepared cache, or one of its files is missing or damaged."""


class ManifestError(DataError):
    """A `fm3d prepare` manifest lacks required columns or has unusable rows."""
