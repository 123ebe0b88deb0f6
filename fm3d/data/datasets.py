"""Training samples from a prepared cache: the configured views, report text and label arrays.

A sample reads only the voxels it needs: the study's int16 array is a memory map, each view
slices its region from it first and copies only that slab (padded with the HU window floor
where the volume is smaller than the region; `fm3d.data.regions`). Intensities are clipped to
`hu_window` and scaled linearly to `intensity_range` - MONAI's `ScaleIntensityRanged(a_min,
a_max, b_min, b_max, clip=True)`; the default [0, 1] is VoCo's and Merlin's, [-1, 1] CT-CLIP's.
Padding therefore reads the range's low end. The clip happens on integers while copying the
slab and the float scaling writes straight into the output crops, so a VoCo sample costs about
two passes over its voxels (docs/benchmarks/data_loading.md).

Each sample is a dict; a batch follows the contract of docs/datasets.md (`study_id`, each
view's keys, `report`/`has_report`, `report_embedding` with a text-embedding cache, one
tensor per label column + `has_ehr`). Missing modalities are masks, never dropped samples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fm3d.data.augment import AugmentConfig
from fm3d.data.cache import PreparedCache
from fm3d.data.collate import collate_samples
from fm3d.data.errors import DataError
from fm3d.data.tables import LabelTable, ReportTable
from fm3d.data.views import View, ViewContext
from fm3d.spec import InputSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSpec:
    """What one sample contains and how it is cut.

    views: the views cut from each volume, in the order they draw (`fm3d.data.views.build_views`).
    hu_window: HU clipped and scaled to `intensity_range`.
    intensity_range: the values the window's low and high ends map to.
    augment: random augmentation in training; None for none.
    """

    views: tuple[View, ...] = ()
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    intensity_range: tuple[float, float] = (0.0, 1.0)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        # The window and range follow the input spec's rules (one place checks them).
        InputSpec(hu_window=self.hu_window, intensity_range=self.intensity_range)

    @property
    def window(self) -> tuple[int, int]:
        """hu_window as integers (prepared volumes hold integer HU)."""
        return int(self.hu_window[0]), int(self.hu_window[1])


class CTDataset(Dataset):
    """Samples of prepared studies (see module docstring).

    `train` turns on random region placement and augmentation; otherwise regions are
    centred and VoCo's random crops are drawn from a per-index seed (the same every epoch).
    """

    # The train sampler passes `epoch * len(self) + position` (fm3d.data.base.EpochSampler).
    epoch_in_index: ClassVar[bool] = True

    def __init__(
        self,
        cache: PreparedCache | str | Path,
        study_ids: Sequence[str] | None = None,
        spec: SampleSpec = SampleSpec(),
        reports: ReportTable | None = None,
        labels: LabelTable | None = None,
        report_embeddings: Mapping[str, np.ndarray] | None = None,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.cache = cache if isinstance(cache, PreparedCache) else PreparedCache(cache)
        self.study_ids = list(self.cache.study_ids if study_ids is None else study_ids)
        unknown = [s for s in self.study_ids if s not in self.cache]
        if unknown:
            raise DataError(
                self.cache.root,
                f"{len(unknown)} studies are not prepared in it: {unknown[:5]}",
                "pick study ids from its index.parquet",
            )
        self.spec = spec
        self.context = ViewContext(
            spec.window,
            spec.intensity_range,
            spec.augment if train else None,
            train,
            self.cache.input_spec.target_spacing_mm,
        )
        self.reports, self.labels = reports, labels
        self.report_embeddings = report_embeddings
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        return len(self.study_ids)

    def _generator(self, index: int) -> tuple[int, np.random.Generator]:
        """The study position of `index` and the random stream of that sample.

        A training index carries the epoch (`index = epoch * len(self) + position`, as
        `EpochSampler` passes it), so every draw is a function of (seed, epoch, position):
        the same whatever the worker count, however often a loader is re-created, and after
        resuming from a checkpoint. Evaluation draws from (seed, position): the same crops
        every epoch.
        """
        epoch, position = divmod(index, len(self.study_ids))
        if not self.train:
            return position, np.random.default_rng([self.seed, position])
        return position, np.random.default_rng([self.seed, epoch, position])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._sample(index, {})

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """A whole batch, each sample's view tensors written straight into the batch tensors.

        The DataLoader calls this instead of `__getitem__` per index; it saves the copy a
        stacking collate makes (the largest single cost of a VoCo batch) and, inside a
        worker, allocates the batch in shared memory as `default_collate` does, so handing
        it to the main process copies nothing either.
        """
        batch = {key: _batch_buffer(len(indices), shape) for key, shape in self.sample_shapes().items()}
        samples = [
            self._sample(i, {key: buffer[j] for key, buffer in batch.items()}) for j, i in enumerate(indices)
        ]
        for key in samples[0]:
            if key not in batch:
                batch[key] = collate_samples([{key: sample[key]} for sample in samples])[key]
        return batch

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the per-sample float tensors the views write."""
        return {key: shape for view in self.spec.views for key, shape in view.shapes().items()}

    def _sample(self, index: int, out: dict[str, torch.Tensor]) -> dict[str, Any]:
        position, rng = self._generator(index)
        study_id = self.study_ids[position]
        volume = self.cache.image(study_id)  # memmap, nothing read yet
        sample: dict[str, Any] = {"study_id": study_id}
        for view in self.spec.views:
            sample.update(view.fill(volume, rng, self.context, out))
        if self.reports is not None:
            text = self.reports.get(study_id)
            sample["report"], sample["has_report"] = text, bool(text)
        if self.report_embeddings is not None:
            sample["report_embedding"] = torch.from_numpy(self.report_embeddings[study_id])
        if self.labels is not None:
            arrays, present = self.labels.get(study_id)
            sample.update({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})
            sample["has_ehr"] = present
        return sample


def _batch_buffer(batch_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 batch tensor, in shared memory inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty((batch_size, *shape))
    # As torch's default_collate: a tensor born in shared memory crosses to the main process uncopied.
    storage = torch.empty(0)._typed_storage()._new_shared(batch_size * int(np.prod(shape)), device="cpu")
    return torch.empty(0).new(storage).view(batch_size, *shape)
