"""Segmentation as a suite protocol: a light decoder trained over the frozen encoder, fixed budget.

The downstream segmentation task (`downstream.tasks.segmentation`: the family's UNETR or
SwinUNETR decoder, DiceCE loss, foreground-biased crops, sliding-window inference) trains with
the encoder frozen, by a Lightning Trainer, for exactly `max_steps` steps on the suite's train
studies that have a label map. Nothing is selected on the validation split: the same budget for
every encoder is the comparison (an encoder whose features need more steps to be decoded is
worse at this budget). Each labelled test study is then predicted whole by the task's sliding
window and scored per class with `fm3d.metrics.segmentation.dice_per_class` (NaN where a class
is absent from both prediction and truth, left out of every mean).

The encoder sees the prepared cache the way the task gives it: crops at the cache's spacing in
fm3d's [D, H, W] axes, clipped to the encoder's HU window and scaled to its intensity range
(`DownstreamTask.prepare_image`). So the cache must be prepared at the encoder's spacing, and an
encoder whose axes are MONAI's (x, y, z) cannot run here.

Files in `context.work_dir`: `predictions/<study>.npz` (the predicted class map, key `classes`,
on the prepared grid; class k is `class_names[k - 1]`, 0 background) and Lightning's CSV log.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from downstream.base import safe_name
from downstream.data import SegmentationDataModule
from downstream.data.label_names import LABEL_NAMES_FILE, LabelNamesError, read_label_names, resolve_classes
from downstream.evaluation.encoders import EncoderEntry
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    ScoreFunction,
    register_protocol,
)
from downstream.heads.decoders import DecoderConfigError, build_decoder
from downstream.strategies import FinetuneStrategy
from downstream.tasks.segmentation import SegmentationTask
from fm3d.data.base import LoaderSettings
from fm3d.data.cache import PreparedCache
from fm3d.metrics.segmentation import dice_per_class
from fm3d.models.registry import encoder_family

logger = logging.getLogger(__name__)

# The crop when neither the settings nor the encoder's spec give one (the task's own default).
DEFAULT_CROP = (64, 64, 64)
PREDICTIONS_DIR = "predictions"


def dice_score(per_study: np.ndarray, class_names: list[str]) -> ScoreFunction:
    """Score of any rows of `per_study` ([N, K] Dice, NaN = class absent from both maps).

    `dice/<class>`: the class's mean Dice over the rows where it is scored; `dice_macro`: the
    mean of those over the classes scored at least once (NaN when none is).
    """
    scored = np.isfinite(per_study)
    values = np.where(scored, per_study, 0.0)

    def score(rows: np.ndarray) -> dict[str, float]:
        counts = scored[rows].sum(0)
        per_class = np.divide(
            values[rows].sum(0), counts, out=np.full(len(class_names), np.nan), where=counts > 0
        )
        finite = per_class[counts > 0]
        macro = float(finite.mean()) if finite.size else math.nan
        return {
            **{f"dice/{n}": float(v) for n, v in zip(class_names, per_class, strict=True)},
            "dice_macro": macro,
        }

    return score


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning without its info lines (devices found) and its advice on loader workers."""
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # One process loads the crops on purpose, and a short epoch logs less often than asked.
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            # Lightning's own use of a torch API that torch now deprecates: nothing a user can change.
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
            )
            yield
    finally:
        lightning_logger.setLevel(level)


def _trainer_devices(device: torch.device) -> tuple[str, list[int] | int]:
    """Lightning's (accelerator, devices) for the suite's device."""
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    return device.type, 1


@register_protocol("segmentation")
class Segmentation(Protocol):
    """Per-class Dice of a decoder trained for `max_steps` over the frozen encoder (module docstring).

    Args:
        max_steps: training steps (batches); 0 scores the untrained decoder, the floor.
        lr: AdamW learning rate of the decoder (cosine decay over `max_steps`).
        batch_size: training crops per step.
        image_size: training crop and sliding window (D, H, W) in voxels; None: the encoder
            spec's `image_size` (64 a side when it has none). Divisible by the encoder's patch.
        decoder: a registered decoder (`downstream.heads.decoders`); None: the encoder family's.
        feature_size: UNETR decoder width (the task's `feature_size`; swin decoders use the encoder's).
        class_names: classes to segment, names of the cache's labels.json; None: all it names.
    """

    headline = "dice_macro"

    def __init__(
        self,
        max_steps: int = 200,
        lr: float = 1e-3,
        batch_size: int = 2,
        image_size: tuple[int, int, int] | None = None,
        decoder: str | None = None,
        feature_size: int = 16,
        class_names: list[str] | None = None,
    ) -> None:
        if max_steps < 0:
            raise ProtocolError(f"protocols.segmentation.max_steps must be 0 or more, got {max_steps}")
        if not lr > 0:
            raise ProtocolError(f"protocols.segmentation.lr must be positive, got {lr}")
        if batch_size < 1:
            raise ProtocolError(f"protocols.segmentation.batch_size must be at least 1, got {batch_size}")
        if feature_size < 1:
            raise ProtocolError(f"protocols.segmentation.feature_size must be at least 1, got {feature_size}")
        if image_size is not None and (len(image_size) != 3 or min(image_size) < 1):
            raise ProtocolError(
                f"protocols.segmentation.image_size must be three voxel counts (D, H, W), got {image_size}"
            )
        self.max_steps, self.lr, self.batch_size = max_steps, lr, batch_size
        self.image_size = tuple(int(n) for n in image_size) if image_size is not None else None
        self.decoder, self.feature_size = decoder, feature_size
        self.class_names = list(class_names) if class_names is not None else None

    def unavailable(self, encoder: EncoderEntry) -> str | None:
        """Why the task's crops or decoder do not fit `encoder` (axis order, geometry, no decoder)."""
        if encoder.spec.axis_order != "zyx":
            return (
                f"its input axes are {encoder.spec.axis_order!r}; the segmentation task feeds fm3d's "
                "[D, H, W] ('zyx') crops"
            )
        # Building the decoder is the one complete check of its geometry (depth, patch, family).
        with torch.random.fork_rng(devices=[]):
            try:
                build_decoder(encoder.module, 2, self.feature_size, self.decoder)
            except DecoderConfigError as exc:
                return f"no segmentation decoder fits it: {exc}"
        return None

    def run(self, context: EvalContext) -> ProtocolResult:
        """Train the decoder on train, predict and score the labelled test studies."""
        cache, spec = context.cache, context.encoder.spec
        prepared = cache.input_spec.target_spacing_mm
        if not all(
            math.isclose(a, b, rel_tol=1e-3) for a, b in zip(spec.target_spacing_mm, prepared, strict=True)
        ):
            raise ProtocolError(
                f"{cache.root} was prepared at {list(prepared)} mm but {context.encoder.label} expects "
                f"{list(spec.target_spacing_mm)} mm; the segmentation protocol trains on the prepared "
                "grid, so prepare a cache at the encoder's spacing (fm3d prepare --spacing) for it"
            )
        label_values, class_names = self._classes(cache)
        train, test = (_labelled(cache, context.studies.ids(split)) for split in ("train", "test"))
        if not train or not test:
            raise ProtocolError(
                f"{cache.root}: no suite {'train' if not train else 'test'} study has a label map; "
                "add label_path to the manifest for studies of both splits, or change data.split_fractions"
            )
        image_size = self.image_size or spec.image_size or DEFAULT_CROP
        data = SegmentationDataModule(
            cache.root,
            label_values,
            class_names,
            image_size=image_size,
            loader=LoaderSettings(
                batch_size=self.batch_size,
                seed=context.seed,
                fixed_splits={"train": train, "test": test},
                persistent_workers=False,
            ),
        )
        # Seeded and sealed: the decoder's initialisation, the crops and every loader's base seed
        # draw from the suite's seed, and the caller's random state is left as it was.
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(context.seed)
            task = SegmentationTask(
                context.encoder.module,
                class_names,
                image_size=image_size,
                feature_size=self.feature_size,
                decoder=self.decoder,
                strategy=FinetuneStrategy("frozen"),
                lr=self.lr,
            )
            if self.max_steps:
                self._fit(task, data, context)
            per_study = _predict(task, data, context.device, context.work_dir / PREDICTIONS_DIR)
        score = dice_score(per_study, class_names)
        overall = score(np.arange(len(test)))
        scored = np.isfinite(per_study).sum(0)
        return ProtocolResult(
            test,
            score,
            selected={
                "decoder": self.decoder or encoder_family(context.encoder.module).decoder,
                "image_size": list(image_size),
                "max_steps": self.max_steps,
            },
            tables={
                "per_class": pl.DataFrame(
                    {
                        "class": class_names,
                        "label_value": label_values,
                        "dice": [overall[f"dice/{n}"] for n in class_names],
                        "studies_scored": scored.tolist(),
                    }
                ),
                "per_study": pl.DataFrame(
                    {"study_id": test, **{n: per_study[:, k] for k, n in enumerate(class_names)}}
                ),
            },
        )

    def _classes(self, cache: PreparedCache) -> tuple[list[int], list[str]]:
        """(label values, class names) of `class_names` in the cache's labels.json."""
        names_file = cache.root / LABEL_NAMES_FILE
        if not names_file.is_file():
            raise ProtocolError(
                f"{cache.root} has no {LABEL_NAMES_FILE} naming its label values; put one "
                '({"1": "liver", ...}) beside the manifest and run fm3d prepare again'
            )
        try:
            return resolve_classes(None, self.class_names, read_label_names(names_file), names_file)
        except LabelNamesError as exc:
            raise ProtocolError(f"protocols.segmentation.class_names: {exc}") from exc

    def _fit(self, task: SegmentationTask, data: SegmentationDataModule, context: EvalContext) -> None:
        accelerator, devices = _trainer_devices(context.device)
        with _quiet_lightning():
            trainer = L.Trainer(
                accelerator=accelerator,
                devices=devices,
                max_steps=self.max_steps,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                log_every_n_steps=1,
                logger=CSVLogger(context.work_dir, name="lightning_logs"),
                default_root_dir=context.work_dir,
            )
            trainer.fit(task, datamodule=data)
        logger.info(
            "segmentation decoder of %s trained for %d steps", context.encoder.label, trainer.global_step
        )


def _labelled(cache: PreparedCache, study_ids: list[str]) -> list[str]:
    """The studies of `study_ids` that have a label map, in that order."""
    return [s for s in study_ids if cache.row(s)["label_file"] is not None]


@torch.inference_mode()
def _predict(
    task: SegmentationTask, data: SegmentationDataModule, device: torch.device, out_dir: Path
) -> np.ndarray:
    """Dice [N, K] of each test study's sliding-window prediction; each class map saved to `out_dir`."""
    task.to(device).eval()
    data.setup("test")
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.min_scalar_type(task.num_classes - 1)
    rows = []
    for batch in data.loader("test"):
        classes = task.infer(batch["image"].to(device)).argmax(1, keepdim=True).cpu()  # [1, 1, D, H, W]
        rows.append(dice_per_class(classes, batch["label"], task.num_classes)[0].numpy())
        (study_id,) = batch["study_id"]
        np.savez_compressed(
            out_dir / f"{safe_name(study_id)}.npz", classes=classes[0, 0].numpy().astype(dtype)
        )
    return np.stack(rows)
