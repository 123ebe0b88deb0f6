"""Training samples from a prepared cache: global view, VoCo crops, report text and EHR labels.

A sample reads only the voxels it needs: the study's int16 array is a memory map, the
region of interest is sliced from it first and only that slab is copied (padded with the
HU window floor where the volume is smaller than the region). Intensities are clipped to
`hu_window` and scaled linearly to `intensity_range` - MONAI's `ScaleIntensityRanged(a_min,
a_max, b_min, b_max, clip=True)`; the default [0, 1] is VoCo's and Merlin's, [-1, 1] CT-CLIP's.
Padding therefore reads the range's low end. The clip happens
on integers while copying the slab and the float scaling writes straight into the output
crops, so a VoCo sample costs about two passes over its voxels (docs/benchmarks/data_loading.md).

Each sample is a dict; `collate_samples` stacks a list of them into the batch contract of
docs/datasets.md (`image`, `study_id`, `voco_*`, `report`/`has_report`, one tensor per
label column + `has_ehr`). Missing modalities are masks, never dropped samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info

from fm3d.data.augment import AugmentConfig, AugmentParams, apply_intensity, spatial_view
from fm3d.data.cache import PreparedCache
from fm3d.data.crops import VoCoGeometry, voco_geometry
from fm3d.data.errors import DataError

logger = logging.getLogger(__name__)

Size3 = tuple[int, int, int]
DEFAULT_LABEL_COLUMNS: tuple[str, ...] = ("phenotype", "tte_time", "tte_event")
DEFAULT_REPORT_COLUMNS: tuple[str, ...] = ("findings", "impression")


class TableError(DataError):
    """A reports or labels table cannot be joined to the studies (missing columns, ragged arrays)."""


def read_table(path: str | Path) -> pl.DataFrame:
    """A parquet or CSV table with a study_id column."""
    path = Path(path)
    if not path.is_file():
        raise TableError(path, "does not exist", "check the path given for the reports/labels table")
    table = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    if "study_id" not in table.columns:
        raise TableError(
            path, f"has no study_id column (columns: {table.columns})", "add one to join by study"
        )
    return table.with_columns(pl.col("study_id").cast(pl.String))


class ReportTable:
    """Report text by study_id: the chosen text columns joined with a newline."""

    def __init__(self, table: pl.DataFrame, columns: Sequence[str], source: str | Path = "<reports>") -> None:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise TableError(
                source, f"lacks report columns {missing} (has {table.columns})", "set report_columns"
            )
        texts = table.select(
            "study_id",
            pl.concat_str([pl.col(c).cast(pl.String).str.strip_chars() for c in columns], separator="\n",
                          ignore_nulls=True).alias("text"),
        )  # fmt: skip
        self._text = {sid: (t or "").strip() for sid, t in texts.iter_rows()}

    def get(self, study_id: str) -> str:
        """The report, or "" when the study has none."""
        return self._text.get(study_id, "")


class LabelTable:
    """Per-study label arrays by study_id, one fixed-width array column each (meaning unknown here).

    Boolean columns stay boolean, everything else becomes float32; a study absent from the
    table gets zeros and `has_ehr` False, as does a row whose own `has_ehr` column is False.
    """

    def __init__(self, table: pl.DataFrame, columns: Sequence[str], source: str | Path = "<labels>") -> None:
        self.columns = tuple(columns)
        self.arrays: dict[str, np.ndarray] = {}
        for name in self.columns:
            if name not in table.columns:
                raise TableError(
                    source, f"lacks label column {name!r} (has {table.columns})", "set label_columns"
                )
            column = table[name]
            if isinstance(column.dtype, pl.List):
                widths = column.list.len().unique().to_list()
                if len(widths) != 1 or column.null_count():
                    raise TableError(source, f"column {name!r} has rows of lengths {widths} or nulls",
                                     "every study needs an array of the same length")  # fmt: skip
                column = column.list.to_array(int(widths[0]))
            if not isinstance(column.dtype, pl.Array):
                raise TableError(source, f"column {name!r} is {column.dtype}, not an array per study",
                                 "write one list/array value per study")  # fmt: skip
            values = column.to_numpy()
            boolean = column.dtype.inner == pl.Boolean
            self.arrays[name] = values.astype(np.bool_ if boolean else np.float32).reshape(len(column), -1)
        self._row = {sid: i for i, sid in enumerate(table["study_id"].to_list())}
        # A table may itself flag rows without usable EHR (e.g. `fm3d ehr labels`' has_ehr).
        flags = table["has_ehr"].fill_null(False).cast(pl.Boolean) if "has_ehr" in table.columns else None
        self._has_ehr = np.ones(table.height, bool) if flags is None else flags.to_numpy()

    @property
    def widths(self) -> dict[str, int]:
        return {name: array.shape[1] for name, array in self.arrays.items()}

    def get(self, study_id: str) -> tuple[dict[str, np.ndarray], bool]:
        """(arrays, present): zeros and False for a study the table does not list."""
        row = self._row.get(study_id)
        if row is None:
            return {
                n: np.zeros_like(a[0]) if len(a) else np.zeros(0, a.dtype) for n, a in self.arrays.items()
            }, False
        return {name: array[row] for name, array in self.arrays.items()}, bool(self._has_ehr[row])


@dataclass(frozen=True)
class SampleSpec:
    """What one sample contains and how it is cut.

    image_size: (D, H, W) of the global view for CLIP/EHR heads; None skips it.
    image_region: voxels read for the global view, resized to image_size (None: = image_size).
    hu_window: HU clipped and scaled to `intensity_range`.
    intensity_range: the values the window's low and high ends map to.
    voco: VoCo geometry (preset name or instance), None for no VoCo crops.
    augment: random augmentation in training; None for none. The global view gets
        intensity changes only: flipping it would contradict laterality in its report.
    """

    image_size: Size3 | None = (160, 224, 224)
    image_region: Size3 | None = None
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    intensity_range: tuple[float, float] = (0.0, 1.0)
    voco: str | VoCoGeometry | None = None
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        lo, hi = self.hu_window
        if not (float(lo).is_integer() and float(hi).is_integer() and lo < hi):
            raise ValueError(
                f"hu_window must be whole HU values (low, high) with low < high, got {self.hu_window}"
            )
        low, high = self.intensity_range
        if not low < high:
            raise ValueError(
                f"intensity_range must be (low, high) with low < high, got {self.intensity_range}"
            )

    @property
    def window(self) -> tuple[int, int]:
        """hu_window as integers (prepared volumes hold integer HU)."""
        return int(self.hu_window[0]), int(self.hu_window[1])


def read_region(
    volume: np.ndarray, start: Sequence[int], size: Sequence[int], hu_window: tuple[int, int]
) -> np.ndarray:
    """Window-shifted integer copy of volume[start : start + size]: clip(x, lo, hi) - lo.

    Touches only the slab (one pass: clip from the memmap into the output); voxels outside
    the volume read 0, i.e. the HU floor. Integers keep the copy small; the float scaling
    happens once, straight into the output crops (`scale_window`).
    """
    lo, hi = hu_window
    out = np.zeros(tuple(size), dtype=np.int16 if hi - lo <= np.iinfo(np.int16).max else np.int32)
    src, dst = [], []
    for s, n, length in zip(start, size, volume.shape, strict=True):
        a, b = max(s, 0), min(s + n, length)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    target = out[tuple(dst)]
    np.clip(volume[tuple(src)], lo, hi, out=target, casting="unsafe")  # the only read of the volume
    np.subtract(target, lo, out=target, casting="unsafe")
    return out


def scale_window(
    shifted: torch.Tensor,
    hu_window: tuple[int, int],
    intensity_range: tuple[float, float] = (0.0, 1.0),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Window-shifted values (0 .. hi - lo) to floats in `intensity_range` (into `out` when given).

    The one scaling of HU input in fm3d: the data loaders apply it to integer slabs, downstream
    tasks (`DownstreamTask.prepare_image`) to clipped float batches on any device.
    """
    lo, hi = hu_window
    low, high = intensity_range
    if out is None:
        out = torch.empty(shifted.shape, device=shifted.device)
    # A converting copy then in-place arithmetic is ~3x faster than one promoting multiply on
    # strided integer input (measured with one thread).
    out.copy_(shifted).mul_((high - low) / (hi - lo))
    return out.add_(low) if low else out


def region_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator | None) -> list[int]:
    """Random (rng) or centred (None) corner of a region; a smaller volume sits centred in it."""
    starts = []
    for n, s in zip(shape, size, strict=True):
        if n <= s:
            starts.append(-((s - n) // 2))  # symmetric padding, as MONAI SpatialPad
        else:
            starts.append(int(rng.integers(0, n - s + 1)) if rng is not None else (n - s) // 2)
    return starts


class CTDataset(Dataset):
    """Samples of prepared studies (see module docstring).

    `train` turns on random region placement and augmentation; otherwise regions are
    centred and VoCo's random crops are drawn from a per-index seed (the same every epoch).
    """

    def __init__(
        self,
        cache: PreparedCache | str | Path,
        study_ids: Sequence[str] | None = None,
        spec: SampleSpec = SampleSpec(),
        reports: ReportTable | None = None,
        labels: LabelTable | None = None,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.cache = cache if isinstance(cache, PreparedCache) else PreparedCache(cache)
        self.study_ids = list(self.cache.study_ids if study_ids is None else study_ids)
        unknown = [s for s in self.study_ids if s not in self.cache]
        if unknown:
            raise KeyError(f"{len(unknown)} studies are not prepared in {self.cache.root}: {unknown[:5]}")
        self.spec = spec
        self.geometry: VoCoGeometry | None = None if spec.voco is None else voco_geometry(spec.voco)
        self.reports, self.labels = reports, labels
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        return len(self.study_ids)

    def _generator(self, index: int) -> tuple[int, np.random.Generator]:
        """The study position of `index` and the random stream of that sample.

        A training index may carry the epoch (`index = epoch * len(self) + position`, as
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
        """A whole batch, each sample's volumes written straight into the batch tensors.

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
        """Shapes of the per-sample volume tensors (image, VoCo bases and crops)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.spec.image_size is not None:
            shapes["image"] = (1, *self.spec.image_size)
        if self.geometry is not None:
            shapes["voco_bases"] = (self.geometry.num_bases, 1, *self.geometry.crop_shape)
            shapes["voco_crops"] = (self.geometry.num_random_crops, 1, *self.geometry.crop_shape)
        return shapes

    def _sample(self, index: int, out: dict[str, torch.Tensor]) -> dict[str, Any]:
        position, rng = self._generator(index)
        study_id = self.study_ids[position]
        volume = self.cache.image(study_id)  # memmap, nothing read yet
        augment = self.spec.augment if self.train else None
        sample: dict[str, Any] = {"study_id": study_id}
        if self.spec.image_size is not None:
            sample["image"] = self._global_view(volume, rng, augment, out.get("image"))
        if self.geometry is not None:
            sample.update(self._voco(volume, rng, augment, out.get("voco_bases"), out.get("voco_crops")))
        if self.reports is not None:
            text = self.reports.get(study_id)
            sample["report"], sample["has_report"] = text, bool(text)
        if self.labels is not None:
            arrays, present = self.labels.get(study_id)
            sample.update({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})
            sample["has_ehr"] = present
        return sample

    def _global_view(self, volume: np.ndarray, rng, augment: AugmentConfig | None, out=None) -> torch.Tensor:
        size = self.spec.image_size
        region = self.spec.image_region or size
        start = region_start(volume.shape, region, rng if self.train else None)
        shifted = torch.from_numpy(read_region(volume, start, region, self.spec.window))
        if tuple(region) == tuple(size):
            into = None if out is None else out[0]
            x = scale_window(shifted, self.spec.window, self.spec.intensity_range, into)[None]
        else:
            scaled = scale_window(shifted, self.spec.window, self.spec.intensity_range)[None, None]
            x = _resized(scaled, tuple(size), None if out is None else out[None])[0]
        if augment is not None:
            apply_intensity(x[None], AugmentParams.draw(1, rng, augment, spatial=False))
        return x  # [1, D, H, W]

    def _voco(self, volume: np.ndarray, rng, augment: AugmentConfig | None, bases=None, crops=None) -> dict:
        g, window = self.geometry, self.spec.window
        start = region_start(volume.shape, g.region_size, rng if self.train else None)
        region = torch.from_numpy(read_region(volume, start, g.region_size, window))  # [D, n*b, n*b]
        b, depth = g.base_size, g.region_size[0]
        resize = g.output_size != b
        # Without a resize the crops are written straight into the given (batch) tensors.
        base_out = bases if bases is not None and not resize else torch.empty((g.num_bases, 1, depth, b, b))
        crop_out = (
            crops if crops is not None and not resize else torch.empty((g.num_random_crops, 1, depth, b, b))
        )
        # Each crop goes from the integer region (turned/flipped there, where it is cheap)
        # straight into its float slot; bases in VoCo's x-major order k = i * n + j.
        base_params = None if augment is None else AugmentParams.draw(g.num_bases, rng, augment)
        centres = g.draw_random_centres(rng)
        crop_params = None if augment is None else AugmentParams.draw(g.num_random_crops, rng, augment)
        for stack, starts, params in ((base_out, g.base_starts(), base_params),
                                      (crop_out, g.random_starts(centres), crop_params)):  # fmt: skip
            for c, (h, w) in enumerate(starts):
                crop = region[:, h : h + b, w : w + b]
                view = crop if params is None else spatial_view(crop, params, c)
                scale_window(view, window, self.spec.intensity_range, out=stack[c, 0])
        if resize:  # VoCo v1: Resized(mode="bilinear", align_corners=True) to 64^3
            base_out, crop_out = (
                _resized(base_out, g.crop_shape, bases),
                _resized(crop_out, g.crop_shape, crops),
            )
        if augment is not None:
            apply_intensity(base_out, base_params)
            apply_intensity(crop_out, crop_params)
        labels = torch.from_numpy(g.overlap_labels(centres).astype(np.float32))
        return {"voco_bases": base_out, "voco_crops": crop_out, "voco_labels": labels}


def _resized(x: torch.Tensor, size: Size3, out: torch.Tensor | None) -> torch.Tensor:
    resized = F.interpolate(x, size=size, mode="trilinear", align_corners=True)
    return resized if out is None else out.copy_(resized)


def _batch_buffer(batch_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 batch tensor, in shared memory inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty((batch_size, *shape))
    # As torch's default_collate: a tensor born in shared memory crosses to the main process uncopied.
    storage = torch.empty(0)._typed_storage()._new_shared(batch_size * int(np.prod(shape)), device="cpu")
    return torch.empty(0).new(storage).view(batch_size, *shape)


def collate_samples(samples: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Stack samples into a batch dict: tensors stacked, strings listed, flags as bool tensors.

    A batch that `CTDataset.__getitems__` already assembled passes through unchanged.
    """
    if isinstance(samples, dict):
        return samples
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = values
    return batch
