"""One fixed-size HU crop per study plus the study's targets: the loaders of the classification,
survival, zero-shot and language tasks.

Crops are centred (`fm3d.data.regions.study_crop`); training crops shift at random by up to
`crop_shift` of their size. Crops that do not fit are padded with air (-1024 HU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from fm3d.data.base import LoaderSettings, StudyDataModule
from fm3d.data.regions import study_crop

# Downstream sets are small: a larger share of patients goes to validation and test than in
# pretraining. A default the CLI shows (a LoaderSettings default fills any key a YAML leaves out).
TASK_LOADER = LoaderSettings(split_fractions=(0.7, 0.15, 0.15))


class StudyCrops(Dataset):
    """One fixed-size HU crop per study (shifted at random in training, centred otherwise) plus
    whatever the data module's `targets(study_id)` returns (label tensors, report text)."""

    def __init__(self, module: StudyCropDataModule, study_ids: list[str], train: bool) -> None:
        self.module, self.study_ids = module, study_ids
        self.max_shift = module.crop_shift if train else None

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study_id = self.study_ids[index]
        image = study_crop(self.module.cache.image(study_id), self.module.image_size, self.max_shift)
        return {"image": image, "study_id": study_id, **self.module.targets(study_id)}


class StudyCropDataModule(StudyDataModule):
    """Loaders of one crop per study plus the study's `targets` (labels, report) per split.

    Subclasses define `targets(study_id)` and may set `crop_shift`: the largest random shift of
    a training crop, as a share of its size. "predict" loads the test split.

    Args:
        cache_dir: folder written by `fm3d prepare`.
        image_size: (D, H, W) crop in voxels.
        loader: batch size, workers, split fractions, seed and fixed splits (`LoaderSettings`).
    """

    crop_shift: ClassVar[float] = 0.25
    predict_split = "test"
    # Every labelled study counts in a small downstream set: keep a ragged last training batch.
    drop_last_train = False

    def __init__(
        self,
        cache_dir: str | Path,
        image_size: tuple[int, int, int] = (64, 64, 64),
        loader: LoaderSettings = TASK_LOADER,
    ) -> None:
        super().__init__(cache_dir, loader)
        self.image_size = tuple(image_size)

    def targets(self, study_id: str) -> dict[str, Any]:
        """The batch entries of one study besides its image and id."""
        raise NotImplementedError(f"{type(self).__name__} does not say what a study's targets are")

    def dataset(self, split: str) -> StudyCrops:
        return StudyCrops(self, self.study_ids(split), train=split == "train")
