"""Read side of a prepared cache: memory-mapped int16 studies and their index.

`fm3d prepare` writes the cache; datasets read it through `PreparedCache`. Layout::

    ROOT/index.parquet            one row per study (schema below)
    ROOT/studies/<study_id>.npy   int16 HU, [D, H, W] = (z, y, x) of the RAS-canonical volume
                                  (or <study_id>.b2nd, chunked and compressed: fm3d.data.cache_formats)
    ROOT/labels/<study_id>.npy    optional label map on the same grid (integer dtype; or .b2nd)
    ROOT/failures.parquet         studies that could not be prepared (study_id, source, error)
    ROOT/labels.json              optional {label value: name}, copied from beside the manifest

Index columns (`INDEX_COLUMNS`): study_id, patient_id, status ("ok" for usable rows),
image_file and label_file (paths relative to ROOT; label_file null without a label),
shape [D, H, W], spacing [D, H, W] in mm, affine (16 floats, row-major 4x4 mapping a
[d, h, w] index to RAS world mm), hu_p1, hu_p50, hu_p99, source_path, source_hash,
settings (JSON: the spec's `target_spacing_mm` and `hu_window`, and the series chosen; read
back as `PreparedCache.input_spec`), record (JSON preprocessing record, see
`fm3d.data.preprocess.PreprocessRecord`), plus every extra manifest column.

Images come back as arrays read on slicing, whatever the study's format (its file's suffix): a
read-only memory map of a `.npy`, or a `CompressedVolume` of a `.b2nd` that decompresses only
the chunks a slice touches. So a dataset that crops before copying only reads the slab it needs.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fm3d.data.cache_formats import VolumeArray, open_array
from fm3d.data.errors import CacheError
from fm3d.spec import InputSpec, InputSpecError

INDEX_FILE = "index.parquet"
FAILURES_FILE = "failures.parquet"
STUDIES_DIR = "studies"
LABELS_DIR = "labels"
LABEL_NAMES_FILE = "labels.json"

INDEX_COLUMNS: tuple[str, ...] = (
    "study_id",
    "patient_id",
    "status",
    "image_file",
    "label_file",
    "shape",
    "spacing",
    "affine",
    "hu_p1",
    "hu_p50",
    "hu_p99",
    "source_path",
    "source_hash",
    "settings",
    "record",
)


class PreparedCache:
    """A folder written by `fm3d prepare`, opened for reading.

    `index` holds only usable studies (status == "ok"); `image` and `label` return arrays
    that read voxels only when sliced (`fm3d.data.cache_formats`), never copies.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise CacheError(
                self.root,
                f"no {INDEX_FILE} in it, so it is not a prepared cache",
                "create one with `fm3d prepare --manifest MANIFEST --out DIR`",
            )
        try:
            index = pl.read_parquet(index_path)
        except Exception as exc:  # pyarrow/polars raise several types for a damaged file
            raise CacheError(
                index_path, f"cannot be read as parquet ({exc})", "re-run `fm3d prepare` on this folder"
            ) from exc
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise CacheError(
                index_path,
                f"lacks the index columns {missing}",
                "it was not written by `fm3d prepare`; re-run it into a fresh folder",
            )
        self._adopt_index(index.filter(pl.col("status") == "ok"))

    def _adopt_index(self, index: pl.DataFrame) -> None:
        """Serve the studies of `index` (usable rows only); a cache read another way calls it too."""
        self.index: pl.DataFrame = index
        self.study_ids: list[str] = index["study_id"].to_list()
        self._rows: dict[str, dict[str, Any]] = {row["study_id"]: row for row in index.iter_rows(named=True)}

    def __len__(self) -> int:
        return len(self.study_ids)

    def __contains__(self, study_id: object) -> bool:
        return study_id in self._rows

    def __repr__(self) -> str:
        return f"PreparedCache({str(self.root)!r}, studies={len(self)})"

    def row(self, study_id: str) -> dict[str, Any]:
        """The study's index row as a dict (extra manifest columns included)."""
        try:
            return self._rows[study_id]
        except KeyError:
            raise KeyError(
                f"study {study_id!r} is not a prepared study in {self.root} "
                f"({len(self)} studies; see {FAILURES_FILE} for those that failed)"
            ) from None

    def image(self, study_id: str) -> VolumeArray:
        """The study's int16 HU volume [D, H, W], sliced on read (a memory map or a `CompressedVolume`)."""
        return self._load(self.row(study_id)["image_file"])

    def label(self, study_id: str) -> VolumeArray | None:
        """The study's label map [D, H, W], sliced on read as `image`, or None without one."""
        label_file = self.row(study_id)["label_file"]
        return None if label_file is None else self._load(label_file)

    def spacing(self, study_id: str) -> tuple[float, float, float]:
        """Voxel spacing in mm, (D, H, W) order."""
        d, h, w = self.row(study_id)["spacing"]
        return (float(d), float(h), float(w))

    def shape(self, study_id: str) -> tuple[int, int, int]:
        """Array shape (D, H, W) without opening the array."""
        d, h, w = self.row(study_id)["shape"]
        return (int(d), int(h), int(w))

    def affine(self, study_id: str) -> np.ndarray:
        """4x4 matrix mapping a [d, h, w] index of the prepared array to RAS world mm."""
        return np.asarray(self.row(study_id)["affine"], dtype=np.float64).reshape(4, 4)

    @cached_property
    def input_spec(self) -> InputSpec:
        """The input spec the studies were prepared with: spacing and HU window (the rest default).

        Read back from each study's recorded `settings`; a cache whose studies were prepared
        with different settings has no one spec and is refused.
        """
        index_path = self.root / INDEX_FILE
        specs = {_prepared_spec(s, index_path) for s in self.index["settings"].unique().to_list()}
        if not specs:
            raise CacheError(
                self.root, "has no prepared studies", "see failures.parquet and re-run `fm3d prepare`"
            )
        if len(specs) != 1:
            found = sorted((list(s.target_spacing_mm), list(s.hu_window)) for s in specs)
            raise CacheError(
                self.root,
                f"its studies were prepared with different settings (spacing mm, HU window): {found}",
                "prepare them again with one --spacing and --hu-window, or split the cache",
            )
        return specs.pop()

    def record(self, study_id: str) -> dict[str, Any]:
        """The preprocessing record (JSON-decoded) that `invert_preprocessing` needs."""
        return json.loads(self.row(study_id)["record"])

    def _load(self, relative: str) -> VolumeArray:
        return open_array(self.root / relative)


def recorded_settings(spec: InputSpec) -> dict[str, list[float]]:
    """What a study's `settings` records of the spec it was prepared with (only these two matter there)."""
    return {
        "target_spacing_mm": [float(s) for s in spec.target_spacing_mm],
        "hu_window": [float(v) for v in spec.hu_window],
    }


def _prepared_spec(settings: str, index_path: Path) -> InputSpec:
    """The spec in one study's recorded settings JSON (keys target_spacing_mm and hu_window)."""
    recorded = json.loads(settings)
    try:
        return InputSpec(target_spacing_mm=recorded["target_spacing_mm"], hu_window=recorded["hu_window"])
    except (KeyError, InputSpecError) as exc:
        raise CacheError(
            index_path,
            f"has study settings {settings} without a usable spacing and HU window ({exc})",
            "re-run `fm3d prepare` on this folder",
        ) from exc
