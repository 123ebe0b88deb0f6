"""Training samples from a prepared cache: global view, VoCo crops, report text and EHR labels.

A sample reads only the voxels it needs: the study's int16 array is a memory map, the
region of interest is sliced from it first and only that slab is copied (padded with the
HU window floor where the volume is smaller than the region). Intensities are clipped to
`hu_window` and scaled to [0, 1] - MONAI's `ScaleIntensityRanged(a_min, a_max, b_min=0,
b_max=1, clip=True)` as VoCo and Merlin use it; padding therefore reads 0.

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
from torch.utils.data import Dataset

from fm3d.data.augment import AugmentConfig, AugmentParams, apply_augmentation
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
    table gets zeros and `has_ehr` False.
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
        return {name: array[row] for name, array in self.arrays.items()}, True


@dataclass(frozen=True)
class SampleSpec:
    """What one sample contains and how it is cut.

    image_size: (D, H, W) of the global view for CLIP/EHR heads; None skips it.
    image_region: voxels read for the global view, resized to image_size (None: = image_size).
    hu_window: HU clipped and scaled to [0, 1].
    voco: VoCo geometry (preset name or instance), None for no VoCo crops.
    augment: random augmentation in training; None for none. The global view gets
        intensity changes only: flipping it would contradict laterality in its report.
    """

    image_size: Size3 | None = (160, 224, 224)
    image_region: Size3 | None = None
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    voco: str | VoCoGeometry | None = None
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)


def read_region(volume: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """float32 copy of volume[start : start + size], touching only that slab; outside reads `fill`."""
    out = np.full(tuple(size), fill, dtype=np.float32)
    src, dst = [], []
    for s, n, length in zip(start, size, volume.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, length)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = volume[tuple(src)]  # the only copy: the slab, converted to float32
    return out


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
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.study_ids)

    def reseed(self, *entropy: int) -> None:
        """Restart the training random stream (called per DataLoader worker by the DataModule)."""
        self._rng = np.random.default_rng([self.seed, *entropy])

    def _generator(self, index: int) -> np.random.Generator:
        if not self.train:  # evaluation: the same crops every epoch
            return np.random.default_rng([self.seed, index])
        if self._rng is None:
            self.reseed()
        return self._rng

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.spec.hu_window
        return (np.clip(x, lo, hi, out=x) - lo) / (hi - lo)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._generator(index)
        study_id = self.study_ids[index]
        volume = self.cache.image(study_id)  # memmap, nothing read yet
        augment = self.spec.augment if self.train else None
        sample: dict[str, Any] = {"study_id": study_id}
        if self.spec.image_size is not None:
            sample["image"] = self._global_view(volume, rng, augment)
        if self.geometry is not None:
            sample.update(self._voco(volume, rng, augment))
        if self.reports is not None:
            text = self.reports.get(study_id)
            sample["report"], sample["has_report"] = text, bool(text)
        if self.labels is not None:
            arrays, present = self.labels.get(study_id)
            sample.update({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})
            sample["has_ehr"] = present
        return sample

    def _global_view(self, volume: np.ndarray, rng, augment: AugmentConfig | None) -> torch.Tensor:
        size = self.spec.image_size
        region = self.spec.image_region or size
        start = region_start(volume.shape, region, rng if self.train else None)
        x = torch.from_numpy(self._normalise(read_region(volume, start, region, self.spec.hu_window[0])))
        x = x[None, None]  # [1, 1, D, H, W]
        if tuple(region) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)
        if augment is not None:
            x = apply_augmentation(x, AugmentParams.draw(1, rng, augment, spatial=False))
        return x[0]  # [1, D, H, W]

    def _voco(self, volume: np.ndarray, rng, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
        g = self.geometry
        start = region_start(volume.shape, g.region_size, rng if self.train else None)
        region = torch.from_numpy(
            self._normalise(read_region(volume, start, g.region_size, self.spec.hu_window[0]))
        )
        b = g.base_size
        bases = torch.stack([region[:, h : h + b, w : w + b] for h, w in g.base_starts()])[:, None]
        centres = g.draw_random_centres(rng)
        crops = torch.stack([region[:, h : h + b, w : w + b] for h, w in g.random_starts(centres)])[:, None]
        if g.output_size != b:  # VoCo v1: Resized(mode="bilinear", align_corners=True) to 64^3
            bases = F.interpolate(bases, size=g.crop_shape, mode="trilinear", align_corners=True)
            crops = F.interpolate(crops, size=g.crop_shape, mode="trilinear", align_corners=True)
        if augment is not None:
            bases = apply_augmentation(bases, AugmentParams.draw(len(bases), rng, augment))
            crops = apply_augmentation(crops, AugmentParams.draw(len(crops), rng, augment))
        labels = torch.from_numpy(g.overlap_labels(centres).astype(np.float32))
        return {"voco_bases": bases.contiguous(), "voco_crops": crops.contiguous(), "voco_labels": labels}


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch dict: tensors stacked, strings listed, flags as bool tensors."""
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
