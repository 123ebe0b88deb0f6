"""Segmentation: a UNETR / SwinUNETR decoder over the encoder, DiceCE loss, sliding-window inference.

Training sees random ROI crops; validation and test run MONAI's sliding-window inference over
whole prepared volumes (gaussian blending, configurable ROI and overlap) and score per-class
Dice (`fm3d.metrics.segmentation`, nnU-Net's empty-label convention: a class absent from both
prediction and ground truth is NaN and left out of the means). `predict` writes each label map
as NIfTI on the ORIGINAL image grid — resampling and reorientation undone with the study's
preprocessing record — so it overlays the source CT in any viewer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import polars as pl
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from downstream.base import DownstreamTask, Evaluation, StepOutput
from downstream.data import SegmentationDataModule
from downstream.heads.decoders import build_decoder
from downstream.registry import register_task
from fm3d.data.preprocess import PreprocessRecord, invert_preprocessing
from fm3d.metrics.segmentation import dice_per_class, mean_dice

logger = logging.getLogger(__name__)


@register_task("segmentation")
class SegmentationTask(DownstreamTask):
    """Volumetric segmentation of `class_names` (background is class 0, added here).

    Args:
        class_names: foreground class names, in label order (linked from the data module, which
            takes them from the data's labels.json).
        image_size: sliding-window size (D, H, W), the training crop's (linked from the data module);
            divisible by the encoder's patch (32 for swin).
        overlap: sliding-window overlap fraction.
        sw_batch_size: windows per forward pass during inference.
        feature_size: decoder width (UNETR's feature_size; swin decoders use the encoder's).
        decoder: a registered decoder name (`downstream.heads.decoders`); None takes the one the
            encoder's family declares (unetr for vit3d, swin_unetr for swin3d).
        prediction_dir: where `predict` writes NIfTI label maps (default: <run>/predictions).
        kwargs: strategy, lr, weight_decay, warmup_steps, encoder_overrides (see DownstreamTask).
    """

    datamodule_class = SegmentationDataModule
    # class_names from the instantiated data module: it resolves them against the data's labels.json.
    cli_links = (
        ("data", "model.class_names", lambda data: data.class_names),
        ("data.image_size", "model.image_size"),
    )

    def __init__(
        self,
        encoder: str | nn.Module,
        class_names: list[str],
        image_size: tuple[int, int, int] = (64, 64, 64),
        overlap: float = 0.25,
        sw_batch_size: int = 2,
        feature_size: int = 16,
        decoder: str | None = None,
        prediction_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names) + 1
        self.image_size = tuple(image_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.prediction_dir = prediction_dir
        self.decoder, self.hidden_layers = build_decoder(
            self.encoder, self.num_classes, feature_size, decoder
        )
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K+1, D, H, W] of a normalised input crop [B, 1, D, H, W]."""
        return self.decoder(x, self.encoder(x, hidden_layers=self.hidden_layers))

    def infer(self, image_hu: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits over whole HU volumes [B, 1, D, H, W] (gaussian-blended windows)."""
        return sliding_window_inference(
            self.prepare_image(image_hu),
            roi_size=self.image_size,
            sw_batch_size=self.sw_batch_size,
            predictor=self,
            overlap=self.overlap,
            mode="gaussian",
        )

    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        label = batch["label"]
        if stage == "train":
            logits = self(self.prepare_image(batch["image"]))
            return StepOutput(self.loss_fn(logits, label))
        logits = self.infer(batch["image"])
        dice = dice_per_class(logits.argmax(1, keepdim=True), label, self.num_classes)
        return StepOutput(self.loss_fn(logits, label), {"dice": dice, "study_id": list(batch["study_id"])})

    def summarize(self, collected: dict[str, Any], stage: str) -> Evaluation:
        per_class, overall = mean_dice(collected["dice"])
        table = pl.DataFrame(
            {
                "class": self.class_names,
                "dice": per_class.tolist(),
                "volumes_scored": (~torch.isnan(collected["dice"])).sum(0).tolist(),
            }
        )
        metrics = {
            "dice_mean": overall,
            **{f"dice_{n}": float(v) for n, v in zip(self.class_names, per_class, strict=True)},
        }
        return Evaluation(self.task_name, metrics, {"dice_per_class": table})

    def figures(self, collected: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
        from downstream.plots import dice_per_class_figure

        return {"dice_per_class": dice_per_class_figure(evaluation.tables["dice_per_class"])}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Path]:
        """Write each volume's predicted label map on its source grid; returns the written paths."""
        labels = self.infer(batch["image"]).argmax(1).to(torch.uint8).cpu().numpy()  # [B, D, H, W]
        out_dir = Path(self.prediction_dir or Path(self.trainer.default_root_dir) / "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for study_id, record_json, label in zip(batch["study_id"], batch["record"], labels, strict=True):
            record = PreprocessRecord.from_dict(json.loads(record_json))
            original = invert_preprocessing(label, record, is_label=True)
            affine = np.asarray(record.original_affine, dtype=np.float64).reshape(4, 4)
            image = nib.Nifti1Image(original.astype(np.uint8), affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            path = out_dir / f"{study_id}_seg.nii.gz"
            nib.save(image, path)
            paths.append(path)
        logger.info("wrote %d predicted label maps to %s", len(paths), out_dir)
        return paths
