"""`Volume`: a 3D image with its geometry, what every reader (NIfTI, NRRD, DICOM) returns.

Its own module so the readers (`fm3d.data.io`, `fm3d.data.dicom`, `fm3d.data.dicom_stack`)
all import it from here and none of them imports another to get it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D image in the file's own voxel order, with the geometry to place it in the patient.

    `array` holds HU for CT (int16 when the stored values are whole numbers that fit,
    float32 otherwise) or integer labels for label maps; `affine` maps a voxel index
    (i, j, k) of `array` to RAS world mm; `spacing` is the voxel size along each array
    axis in mm; `meta` records the source path, format and modality.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)
