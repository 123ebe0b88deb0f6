"""Exceptions of the EHR side, one class per failure family.

Each names the file (or table) and the column at fault and says what to do, because the person
reading it is usually converting a hospital's data and needs to know where to look.
"""

from __future__ import annotations

from fm3d.errors import Fm3dError, PathError


class EHRError(PathError):
    """Base of fm3d's EHR errors: where, what is wrong, and what to do."""


class MEDSFormatError(EHRError):
    """A folder is not a readable MEDS dataset: missing files, columns, wrong dtypes or unsorted events."""


class StudyTableError(EHRError):
    """A studies table (study_id, subject_id, study_time) lacks columns or has unusable values."""


class TaskSpecError(EHRError):
    """A task list or phenotype mapping is empty, malformed or names nothing present in the data."""


class EHRSettingError(Fm3dError, ValueError):
    """A setting that cannot work (a count below 1, a reversed year range), refused before any work."""
