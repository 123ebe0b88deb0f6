"""Task data wiring on top of fm3d's prepared cache: splits, crops, label tables and reports.

Every data module reads a `fm3d prepare` cache (`fm3d.data.cache.PreparedCache`) and splits it
by patient (`fm3d.data.split.split_studies`), or by `fixed_splits` when given. Images come out
as float HU `[B, 1, D, H, W]`: the task scales them with its encoder's HU window
(`DownstreamTask.prepare_image`), so data and encoder can never disagree about it.

- `SegmentationDataModule` (segmentation.py): foreground-biased training crops, whole volumes to
  evaluate, label values remapped to classes 1..K.
- `ClassificationDataModule`, `SurvivalDataModule` (study_tables.py): one crop per study joined
  to a per-study label table.
- `ReportDataModule` (reports.py): one crop per study paired with its report text.
"""

from downstream.data.errors import TaskDataError
from downstream.data.reports import ReportDataModule
from downstream.data.segmentation import SegmentationDataModule
from downstream.data.study_tables import ClassificationDataModule, SurvivalDataModule

__all__ = [
    "ClassificationDataModule",
    "ReportDataModule",
    "SegmentationDataModule",
    "SurvivalDataModule",
    "TaskDataError",
]
