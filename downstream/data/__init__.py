"""Task data wiring on fm3d's data path: label maps, label tables and reports joined to a prepared cache.

Every data module is a `fm3d.data.base.StudyDataModule`, as pretraining's is: it reads a
`fm3d prepare` cache, splits it by patient (or by `fixed_splits`), and takes the settings all
modules share as one `loader: LoaderSettings` block. Images come out as float HU
`[B, 1, D, H, W]`: the task scales them with its encoder's HU window
(`DownstreamTask.prepare_image`), so data and encoder can never disagree about it.

- `SegmentationDataModule` (segmentation.py): foreground-biased training crops, whole volumes to
  evaluate, label values remapped to classes 1..K named by the data (label_names.py).
- `ClassificationDataModule`, `SurvivalDataModule` (study_tables.py): one crop per study
  (study_crops.py) joined to a per-study label table.
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
