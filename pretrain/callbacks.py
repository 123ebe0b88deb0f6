"""Callbacks of a pretraining run: export the best encoder (and CLIP heads), draw the plots.

Both write into the run folder (`trainer.default_root_dir`) and log what they wrote as MLflow
artifacts, so the tracking store holds everything a reader needs to use or judge the run.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch

import fm3d
from fm3d.clip import ClipModel, save_clip
from fm3d.models.registry import encoder_from_config
from fm3d.train.checkpoints import best_checkpoint
from fm3d.train.fsdp import gathered_state_dict, read_checkpoint_state
from fm3d.train.tracking import log_artifacts

logger = logging.getLogger(__name__)

# FSDP nests wrapped modules under this attribute; state-dict keys never contain it.
_FSDP_WRAPPED = "_fsdp_wrapped_module."


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


class ExportEncoder(pl.Callback):
    """At the end of fit, write `<run>/export/encoder` (and `<run>/export/clip` when CLIP trains).

    The weights are those of `checkpoints/best.ckpt` when the run kept one (the last epochs
    may overfit), else the weights at the end of fit; `export/source.json` records which
    (checkpoint, monitor and score, epoch, step). Live weights come from the strategy's full
    state dict, which every rank must help build under FSDP (sharded parameters). They are
    loaded into freshly built modules on rank 0, so the export never carries DDP/FSDP/compile
    wrappers. The folders are what `fm3d.load_encoder` and `fm3d.clip.load_clip` read.
    """

    SOURCE_FILE = "source.json"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = best_checkpoint(trainer)
        if best is None:
            state = gathered_state_dict(trainer)  # collective under FSDP
            source = {"checkpoint": None, "epoch": trainer.current_epoch, "step": trainer.global_step}
        if not trainer.is_global_zero:
            return
        if best is not None:
            state = read_checkpoint_state(best.path)  # a file, or a folder of shards under FSDP2
            source = {
                "checkpoint": str(best.path.resolve()),
                "monitor": best.monitor,
                "score": best.score,
                "epoch": best.epoch,
                "step": best.step,
            }
        export_dir = Path(trainer.default_root_dir) / "export"
        encoder = encoder_from_config(pl_module.encoder.config.to_dict())
        encoder.load_state_dict(_sub_state(state, pl_module.exported_encoder_prefix()))
        fm3d.save_encoder(encoder, export_dir / "encoder")
        (export_dir / self.SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        log_artifacts(trainer, export_dir / self.SOURCE_FILE, "export")
        log_artifacts(trainer, export_dir / "encoder", "export/encoder")
        logger.info("exported the encoder to %s (%s)", export_dir / "encoder", self.describe(source))
        for name, module in pl_module.named_modules():
            if isinstance(module, ClipModel):
                clip = ClipModel(module.config)
                clip.load_state_dict(_sub_state(state, name.replace(_FSDP_WRAPPED, "") + "."))
                save_clip(clip, export_dir / "clip")
                log_artifacts(trainer, export_dir / "clip", "export/clip")
                logger.info("exported the CLIP heads and text tower to %s", export_dir / "clip")
                break

    @staticmethod
    def describe(source: dict) -> str:
        """`from best.ckpt: epoch 41, step 1312 (val/clip/loss 1.234)` or `from the end of fit: ...`."""
        where = f"epoch {source['epoch']}, step {source['step']}"
        if source.get("checkpoint"):
            return (
                f"from {Path(source['checkpoint']).name}: {where} ({source['monitor']} {source['score']:.4g})"
            )
        return f"from the end of fit: {where}"

    @classmethod
    def read_source(cls, export_dir: Path) -> str | None:
        """`describe()` of an export folder's `source.json`, if it has one."""
        path = Path(export_dir) / cls.SOURCE_FILE
        return cls.describe(json.loads(path.read_text())) if path.is_file() else None


class TrainingPlots(pl.Callback):
    """Draw loss curves and the validation retrieval recall@K curve into `<run>/plots/`.

    The history is part of the callback's checkpoint state, so a resumed run's curves start
    at step 0, not at the resume point.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def state_dict(self) -> dict:
        return {"history": {key: [list(point) for point in points] for key, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = defaultdict(list)
        for key, points in state_dict["history"].items():
            self.history[key] = [(int(step), float(value)) for step, value in points]

    def _record(self, trainer: pl.Trainer, prefix: str) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and not key.endswith("_epoch"):
                self.history[key.removesuffix("_step")].append((trainer.global_step, float(value)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks' epoch-end hooks run before the module's, which
        # logs the epoch-level retrieval metrics, so the curve would show the previous epoch's.
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._record(trainer, "val/")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        plots = Path(trainer.default_root_dir) / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        written = [self._loss_curves(plots / "loss_curves.png")]
        recall = self._recall_curve(plots / "retrieval_recall_at_k.png")
        if recall is not None:
            written.append(recall)
        for path in written:
            log_artifacts(trainer, path, "plots")

    def _loss_curves(self, path: Path) -> Path:
        """One panel per loss (total and each objective): train per step, validation per epoch.

        Separate panels because the objectives' losses differ by orders of magnitude.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted({key.split("/", 1)[1] for key in self.history if key.endswith("loss")})
        panels = max(len(names), 1)
        fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2), squeeze=False)
        for name, ax in zip(names, axes[0], strict=False):
            for stage, style in (("train", {}), ("val", {"marker": "o"})):
                points = self.history.get(f"{stage}/{name}", [])
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, label=stage, **style)
            ax.set(title=name, xlabel="optimizer step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _recall_curve(self, path: Path) -> Path | None:
        """Recall@K against K from the last validation epoch (CLIP's `i2t_recall_at_K`, `t2i_recall_at_K`)."""
        pattern = re.compile(r"^val/(?P<objective>[^/]+)/(?P<direction>i2t|t2i)_recall_at_(?P<k>\d+)$")
        curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for key, points in self.history.items():
            match = pattern.match(key)
            if match and points:
                label = f"{match['objective']} {match['direction'].replace('2', '→')}"
                curves[label].append((int(match["k"]), points[-1][1]))
        if not curves:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        for label, points in sorted(curves.items()):
            ks, values = zip(*sorted(points), strict=True)
            ax.plot(ks, values, marker="o", label=label)
        ax.set(title="validation retrieval", xlabel="K", ylabel="recall@K", ylim=(0, 1.02), xscale="log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
