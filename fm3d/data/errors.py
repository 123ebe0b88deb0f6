"""Exceptions of fm3d's CT data path, one class per failure family.

Each names the file, what was wrong and what to do, because the person reading the
message is usually looking at one bad study among thousands.
"""

from __future__ import annotations

from fm3d.errors import Fm3dError, PathError


class DataError(PathError):
    """Base of fm3d's data errors: a file, what is wrong with it, and what to do."""


class VolumeReadError(DataError):
    """A CT volume or label map could not be read (format, geometry, modality or voxel values)."""


class CacheError(DataError):
    """A folder is not a usable prepared cache, or one of its files is missing or damaged."""


class ManifestError(DataError):
    """A `fm3d prepare` manifest lacks required columns or has unusable rows."""


class SettingsError(Fm3dError, ValueError):
    """Preparation settings (target spacing, HU window, memory budget) that cannot work.

    Raised before any file is read, so a typo in a command line costs no work.
    """
