"""Public CT datasets read in their publishers' own layouts: one adapter per dataset, found by name.

`fm3d datasets manifest NAME --root DIR --out FOLDER` (fm3d.data.public.cli) writes fm3d's manifest
and, where the dataset has them, reports, labels, official splits and label names.
"""

from fm3d.data.public.registry import (
    DatasetAdapter,
    DatasetLayoutError,
    DatasetTables,
    LayoutReport,
    dataset_names,
    get_adapter,
    register_dataset,
)

__all__ = [
    "DatasetAdapter",
    "DatasetLayoutError",
    "DatasetTables",
    "LayoutReport",
    "dataset_names",
    "get_adapter",
    "register_dataset",
]
