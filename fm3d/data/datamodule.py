"""`CTDataModule`: prepared cache + reports + label arrays -> the pretraining loaders.

Every constructor argument is a plain typed value so LightningCLI fills it from YAML::

    data:
      class_path: fm3d.data.datamodule.CTDataModule
      init_args:
        cache_dir: demo/cache
        labels: demo/labels.parquet
        views: {image: {size: [32, 96, 96]}, voco: {geometry: v2}}
        loader: {batch_size: 8, num_workers: 4}

`views` names the registered views (`fm3d.data.views`) each sample carries, in the order they
draw. `num_phenotypes` and `num_tasks` read the label table's array widths and `input_spec`
says what the loaders feed an encoder, so a model config can be linked to them
(`parser.link_arguments("data.input_spec", "model.input_spec", apply_on="instantiate")`).
Splits, loaders and the sampling randomness are `fm3d.data.base.StudyDataModule`'s.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fm3d.data.augment import AugmentConfig
from fm3d.data.base import LoaderSettings, StudyDataModule
from fm3d.data.cache import PreparedCache
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.errors import DataError
from fm3d.data.streaming import PackedCache, open_cache
from fm3d.data.streaming_loader import ShardStream, StreamingLoader
from fm3d.data.tables import DEFAULT_LABEL_COLUMNS, DEFAULT_REPORT_COLUMNS, LabelTable, ReportTable
from fm3d.data.views import GlobalView, build_views, view_serving
from fm3d.spec import InputSpec
from fm3d.text_cache import TextEmbeddingCache

logger = logging.getLogger(__name__)

DEFAULT_VIEWS: dict[str, dict[str, Any]] = {"image": {"size": [160, 224, 224]}}


class CTDataModule(StudyDataModule):
    """Pretraining loaders over a prepared cache with a patient-level split (see module docstring).

    "predict" loads every prepared study, in index order (embedding extraction).

    Args:
        cache_dir: folder written by `fm3d prepare`.
        reports: parquet/CSV of report text by `id_column`; None reads `report_columns` from
            the cache index when the manifest carried them, else no reports.
        labels: parquet of per-study label arrays by study_id (e.g. from `fm3d ehr labels`);
            None for no label arrays.
        report_columns: text columns joined with a newline into `report`.
        id_column: the reports table's column naming the study (a NIfTI suffix is removed).
        text_embeddings: a report-embedding cache (`fm3d text-cache build` over the same
            reports) whose vectors go into the batch as `report_embedding`, for a frozen text
            tower; every report must be in it (checked at setup).
        label_columns: array columns of `labels` put into the batch under their own names.
        views: view name -> its settings (`fm3d.data.views`); default: the global view
            `image` at 160 x 224 x 224.
        hu_window: HU clipped and scaled to `intensity_range`; inside the window the cache
            was prepared with (checked at setup).
        intensity_range: the values the window's ends map to: [0, 1] (VoCo, Merlin) or
            [-1, 1] (CT-CLIP; zero-centred input, which the demo's from-scratch ViT needs).
        augment: random augmentation of training samples.
        flip_prob, rot90_prob, shift_prob, shift_offset, scale_prob, scale_factor: see
            `fm3d.data.augment.AugmentConfig` (defaults: VoCo-v2's).
        loader: batch size, workers, split fractions, seed (`fm3d.data.base.LoaderSettings`).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        reports: str | Path | None = None,
        labels: str | Path | None = None,
        report_columns: tuple[str, ...] = DEFAULT_REPORT_COLUMNS,
        id_column: str = "study_id",
        text_embeddings: str | Path | None = None,
        label_columns: tuple[str, ...] = DEFAULT_LABEL_COLUMNS,
        views: dict[str, dict[str, Any] | None] | None = None,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        intensity_range: tuple[float, float] = (0.0, 1.0),
        augment: bool = True,
        flip_prob: float = 0.2,
        rot90_prob: float = 0.2,
        shift_prob: float = 0.5,
        shift_offset: float = 0.1,
        scale_prob: float = 0.0,
        scale_factor: float = 0.1,
        loader: LoaderSettings | None = None,
    ) -> None:
        super().__init__(cache_dir, loader)
        # Plain types only: checkpoints carry these and are read with weights_only=True.
        self.save_hyperparameters(ignore="loader")
        self.hparams["loader"] = vars(self.loader_settings).copy()
        self.reports_path = None if reports is None else Path(reports)
        self.labels_path = None if labels is None else Path(labels)
        self.report_columns, self.label_columns = tuple(report_columns), tuple(label_columns)
        self.id_column = id_column
        self.text_embeddings_path = None if text_embeddings is None else Path(text_embeddings)
        augmentation = AugmentConfig(
            flip_prob, rot90_prob, shift_prob, shift_offset, scale_prob, scale_factor
        )
        self.spec = SampleSpec(
            views=build_views(DEFAULT_VIEWS if views is None else views),
            hu_window=tuple(hu_window),
            intensity_range=tuple(intensity_range),
            augment=augmentation if augment else None,
        )
        self.reports: ReportTable | None = None
        self.report_embeddings: dict[str, np.ndarray] | None = None
        self._datasets: dict[str, CTDataset] = {}

    # What the model needs to know about the data, before setup (for LightningCLI links).
    @cached_property
    def label_table(self) -> LabelTable | None:
        return None if self.labels_path is None else LabelTable.read(self.labels_path, self.label_columns)

    @cached_property
    def text_embedding_cache(self) -> TextEmbeddingCache | None:
        """The report-embedding cache of `text_embeddings` (None without one)."""
        path = self.text_embeddings_path
        return None if path is None else TextEmbeddingCache(path)

    @property
    def label_widths(self) -> dict[str, int]:
        """Array width per label column ({} without labels)."""
        return {} if self.label_table is None else self.label_table.widths

    @property
    def num_phenotypes(self) -> int:
        """Width of the "phenotype" label column (0 without one)."""
        return self.label_widths.get("phenotype", 0)

    @property
    def num_tasks(self) -> int:
        """Width of the "tte_time" label column: time-to-event tasks (0 without one)."""
        return self.label_widths.get("tte_time", 0)

    @property
    def input_spec(self) -> InputSpec:
        """What an encoder trained on these loaders expects of its input.

        Spacing from the cache, this module's HU window and intensity range, fm3d's [D, H, W]
        axis order, and the size of the global view (of the first view with a size when there
        is no global view).
        """
        sizes = [view.image_size for view in self.spec.views if view.image_size is not None]
        global_sizes = [view.image_size for view in self.spec.views if isinstance(view, GlobalView)]
        prepared = open_cache(self.cache_dir).input_spec if self.cache is None else self.cache.input_spec
        return prepared.replace(
            hu_window=self.spec.hu_window,
            intensity_range=self.spec.intensity_range,
            axis_order="zyx",
            image_size=(global_sizes or sizes or [None])[0],
        )

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Every key this module's batches carry (after `setup`: reports are known then)."""
        keys = ["study_id", *(key for view in self.spec.views for key in view.keys)]
        if self.reports is not None:
            keys += ["report", "has_report"]
        if self.report_embeddings is not None:
            keys.append("report_embedding")
        if self.label_table is not None:
            keys += [*self.label_columns, "has_ehr"]
        return tuple(keys)

    def setting_for(self, key: str) -> str:
        """The data setting that would put batch key `key` into the batches (for error messages)."""
        view = view_serving(key)
        if view is not None:
            return f"data.views.{view} (fm3d.data.views)"
        if key in ("report", "has_report"):
            return "data.reports or data.report_columns naming report columns of the cache index"
        if key == "report_embedding":
            return "data.text_embeddings to a cache that `fm3d text-cache build` wrote over the same reports"
        return f"data.labels with a {key!r} column listed in data.label_columns"

    def _report_table(self, cache: PreparedCache) -> ReportTable | None:
        if self.reports_path is not None:
            return ReportTable.read(self.reports_path, self.report_columns, self.id_column)
        present = [c for c in self.report_columns if c in cache.index.columns]
        if not present:
            logger.info("no reports: %s has none of the columns %s", cache.root, self.report_columns)
            return None
        return ReportTable.from_index(cache, present)

    def setup(self, stage: str | None = None) -> None:
        """Split the cache, read the reports and check the input spec against the cache's."""
        if self.cache is not None:
            return
        super().setup(stage)
        self.input_spec.check_prepared(self.cache.input_spec, f"the prepared cache {self.cache.root}")
        self.reports = self._report_table(self.cache)
        self.report_embeddings = self._report_embeddings()
        for split, ids in self.splits.items():
            if not ids:
                logger.warning("the %s split of %s is empty (%d studies in all)", split, self.cache.root,
                               len(self.cache))  # fmt: skip

    def _report_embeddings(self) -> dict[str, np.ndarray] | None:
        """Each study's cached report embedding (zeros without a report), all read once at setup."""
        cache = self.text_embedding_cache
        if cache is None:
            return None
        if self.reports is None:
            raise DataError(
                self.text_embeddings_path,
                "holds report embeddings, but these loaders have no reports to look them up by",
                "set data.reports or data.report_columns as for the cache's build",
            )
        ids = self.cache.study_ids
        texts = [self.reports.get(study_id) for study_id in ids]
        missing = cache.missing(texts)
        if missing:
            raise DataError(
                self.text_embeddings_path,
                f"has no embedding for the reports of {len(missing)} of {len(ids)} studies (e.g. "
                f"{[ids[i] for i in missing[:3]]}): the reports changed or other columns were chosen",
                "run `fm3d text-cache build` again over these reports with the same --out (only the "
                "missing ones are embedded)",
            )
        return dict(zip(ids, cache.vectors(texts), strict=True))

    def loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """As `StudyDataModule.loader`; over a streaming pack, the training loader streams its shards.

        Each rank and worker then reads shards of its own, and the loader's position travels in
        checkpoints, so a preempted run resumes mid-epoch (`fm3d.data.streaming_loader`).
        """
        if split != "train" or not isinstance(self.cache, PackedCache):
            return super().loader(split, batch_size)
        settings = self.loader_settings
        stream = ShardStream(self.dataset(split), batch_size or settings.batch_size, seed=settings.seed)
        pin = settings.pin_memory and torch.cuda.is_available()
        return StreamingLoader(stream, num_workers=settings.num_workers, pin_memory=pin)

    def dataset(self, split: str) -> CTDataset:
        """The split's samples; built once, so re-created loaders reuse them."""
        if split not in self._datasets:
            self._datasets[split] = CTDataset(
                self.cache,
                self.study_ids(split),
                self.spec,
                self.reports,
                self.label_table,
                report_embeddings=self.report_embeddings,
                train=split == "train",
                seed=self.loader_settings.seed,
            )
        return self._datasets[split]
