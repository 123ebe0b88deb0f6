"""The PretrainModule: one encoder, several weighted objectives, AdamW + warmup-cosine.

The LightningModule holds the science of a step (encode each view once, sum the weighted
objective losses); the Trainer holds the engineering (devices, precision, gradient clipping,
checkpoints). Objectives are plain `nn.Module`s from `pretrain.objectives`, configured in YAML
as `class_path` + `init_args` *without* `embed_dim`: the config types them as
`Callable[[int], nn.Module]` and the module calls each with the encoder's `embed_dim`, so the
width is written once (in the encoder) and can never disagree.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

import fm3d
from fm3d.io import CKPT_CONFIG_KEY
from fm3d.models.encoder import EncoderOutput
from fm3d.spec import InputSpec
from fm3d.train.fsdp import FSDP2Strategy, gradient_norm, shard_module
from pretrain.data_contract import PretrainConfigError, check_data_module, spec_overrides
from pretrain.objectives.base import Objective
from pretrain.optim import OptimizerSettings, build_optimizer

logger = logging.getLogger(__name__)

# An objective's constructor with every argument but the first (embed_dim) given by the config.
ObjectiveFactory = Callable[[int], nn.Module]


class PretrainModule(pl.LightningModule):
    """Pretrains an fm3d encoder with any mix of VoCo, DINO, MAE, CLIP, phenotype and TTE objectives.

    Args:
        encoder: registry name for `fm3d.create_encoder` (e.g. "vit3d_tiny").
        encoder_overrides: keyword overrides of the encoder config (img/patch size,
            `attention_backend`, ...).
        objectives: name -> objective factory (YAML: `class_path` + `init_args` without
            `embed_dim`). Each objective declares the batch keys it encodes in `views` and all
            it reads in `batch_keys`.
        loss_weights: name -> weight of that objective's loss in the total (default 1 each).
        optimizer: AdamW and schedule settings.
        grad_checkpointing: activation checkpointing inside the encoder blocks (less memory,
            ~30% more compute).
        compile: `torch.compile` the encoder (in place, so checkpoint keys do not change).
        monitor: the validation metric `best.ckpt` and the export are chosen by (default: see
            `checkpoint_monitor`), e.g. "val/clip/i2t_recall_at_5" where a loss turns early.
        monitor_mode: "min" or "max" for `monitor`.
        input_spec: what the data feeds the encoder (`CTDataModule.input_spec`; `fm3d pretrain`
            links it). Its fields that the encoder family's config has are config overrides, so
            checkpoints and the exported encoder state the input the weights were trained on.
            None: the registry's defaults.
    """

    def __init__(
        self,
        encoder: str = "vit3d_tiny",
        encoder_overrides: dict | None = None,
        objectives: dict[str, ObjectiveFactory] | None = None,
        loss_weights: dict[str, float] | None = None,
        optimizer: OptimizerSettings | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        monitor: str | None = None,
        monitor_mode: str = "min",
        input_spec: InputSpec | None = None,
    ) -> None:
        super().__init__()
        if not objectives:
            raise PretrainConfigError("PretrainModule needs an objective: model.objectives is empty")
        if monitor_mode not in ("min", "max"):
            raise PretrainConfigError(f"model.monitor_mode is {monitor_mode!r}; use 'min' or 'max'")
        self.monitor = (monitor, monitor_mode) if monitor else None
        loss_weights = dict(loss_weights or {})
        unknown = sorted(set(loss_weights) - set(objectives))
        if unknown:
            raise PretrainConfigError(
                f"model.loss_weights names {unknown}, which are not objectives ({sorted(objectives)})"
            )
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.encoder_name = encoder
        self.encoder_overrides = {**(encoder_overrides or {}), "grad_checkpointing": grad_checkpointing}
        self.input_spec = input_spec
        from_spec = {} if input_spec is None else spec_overrides(encoder, self.encoder_overrides, input_spec)
        for key, value in from_spec.items():
            given = self.encoder_overrides.get(key, value)
            if (list(given) if isinstance(given, tuple | list) else given) != value:
                raise PretrainConfigError(
                    f"model.encoder_overrides.{key} is {given} but the data's input spec says {value}; "
                    f"drop {key} from model.encoder_overrides: the data module decides it"
                )
        self.encoder = fm3d.create_encoder(encoder, **{**self.encoder_overrides, **from_spec})
        embed_dim = self.encoder.embed_dim
        self.objectives = nn.ModuleDict({name: make(embed_dim) for name, make in objectives.items()})
        for name, objective in self.objectives.items():
            if not isinstance(objective, Objective):
                raise PretrainConfigError(
                    f"model.objectives.{name} is a {type(objective).__qualname__}; an objective must "
                    "subclass pretrain.objectives.base.Objective (docs/objectives.md)"
                )
            # Before compiling: DINO copies the encoder as its teacher, MAE reads its patch grid.
            objective.bind(self.encoder)
        self.loss_weights = {name: float(loss_weights.get(name, 1.0)) for name in objectives}
        # Plain types only: Lightning writes hparams into every checkpoint, and fm3d.load_encoder
        # reads checkpoints with weights_only=True.
        self.save_hyperparameters(
            {
                "encoder": encoder,
                "encoder_overrides": self.encoder_overrides,
                "input_spec": None if input_spec is None else input_spec.to_dict(),
                "objectives": {name: type(obj).__name__ for name, obj in self.objectives.items()},
                "loss_weights": self.loss_weights,
                "optimizer": asdict(self.optimizer_settings),
                "compile": compile,
            }
        )
        if compile:
            self.encoder.compile()

    @property
    def views(self) -> tuple[str, ...]:
        """Batch keys the objectives encode, each once per step, in first-use order."""
        ordered: dict[str, None] = {}
        for objective in self.objectives.values():
            ordered.update(dict.fromkeys(getattr(objective, "views", ("image",))))
        return tuple(ordered)

    def encode(self, batch: dict) -> dict[str, EncoderOutput]:
        """Encode every view the objectives need; views of one spatial size share one encoder call.

        [B, K, 1, d, h, w] views (VoCo bases and crops) are flattened to [B*K, 1, d, h, w].
        Concatenating same-size views keeps the encoder's matmuls large and, under DDP, runs
        the encoder once per step as its reducer expects.
        """
        inputs: dict[str, torch.Tensor] = {}
        for view in self.views:
            if view not in batch:
                raise PretrainConfigError(
                    f"an objective encodes batch key {view!r} but the batch does not carry it "
                    f"(keys: {sorted(batch)}); name the view that writes it in data.views"
                )
            x = batch[view]
            inputs[view] = x.flatten(0, 1) if x.ndim == 6 else x  # [N, 1, d, h, w]
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for view, x in inputs.items():
            by_shape.setdefault(tuple(x.shape[1:]), []).append(view)
        encoded: dict[str, EncoderOutput] = {}
        for views in by_shape.values():
            x = torch.cat([inputs[v] for v in views]) if len(views) > 1 else inputs[views[0]]
            output = self.encoder(x)
            sizes = [inputs[v].shape[0] for v in views]
            encoded.update(zip(views, _split_output(output, sizes), strict=True))
        return encoded

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        encoded = self.encode(batch)
        batch_size = len(batch["study_id"])
        # Training logs per step on each rank; validation logs epoch means synchronised over ranks.
        log = {
            "on_step": stage == "train",
            "on_epoch": stage != "train",
            "sync_dist": stage != "train",
            "batch_size": batch_size,
        }
        total = torch.zeros((), device=self.device)
        for name, objective in self.objectives.items():
            seen = {**encoded, **objective.encode(self.encoder, batch)}
            loss, metrics = objective(batch, seen)
            total = total + self.loss_weights[name] * loss
            self.log(f"{stage}/{name}/loss", loss, **log)
            for key, value in metrics.items():
                self.log(f"{stage}/{name}/{key}", value, **log)
            if stage == "val":
                objective.update_validation(batch, seen)
        self.log(f"{stage}/loss", total, prog_bar=True, **log)
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Schedules inside objectives (DINO's teacher temperature and momentum) follow the step.
        for objective in self.objectives.values():
            objective.on_train_batch_start(self.global_step, self.max_steps)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm of the encoder and of each objective (before clipping).

        The first sign of a diverging run, and the same figure under DDP and FSDP2 (whose
        gradients are shards: `gradient_norm` reduces them). On logging steps only.
        """
        if self.global_step % self.trainer.log_every_n_steps:
            return
        parts = {"encoder": self.encoder, **self.objectives}
        for name, module in parts.items():
            norm = gradient_norm(module)
            if norm is not None:
                self.log(f"train/grad_norm/{name}", norm, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # EMA teachers (VoCo, DINO) follow their students after each optimizer step.
        for objective in self.objectives.values():
            objective.on_train_batch_end()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        for objective in self.objectives.values():
            objective.reset_validation()

    def on_validation_epoch_end(self) -> None:
        """Log each objective's epoch-level validation metrics (AUROC, C-index, retrieval recall)."""
        self.validation_results = {}
        for name, objective in self.objectives.items():
            results = objective.compute_validation()
            self.validation_results[name] = results
            for key, value in results.items():
                self.log(f"val/{name}/{key}", float(value), sync_dist=True)

    def checkpoint_monitor(self) -> tuple[str, str]:
        """The validation metric `checkpoints/best.ckpt` and the export are chosen by, and its mode.

        `model.monitor` when the config names one; else CLIP's validation loss when CLIP trains
        (the objective whose held-out loss turns first when a small cohort overfits), else the
        total validation loss, lowest wins. The demo names held-out R@5: its CLIP loss is
        lowest at epoch 5, while retrieval and C-index keep improving to epoch ~25.
        """
        if self.monitor is not None:
            return self.monitor
        return ("val/clip/loss", "min") if "clip" in self.objectives else ("val/loss", "min")

    def setup(self, stage: str) -> None:
        """Check the objectives against the data module (`pretrain.data_contract`) before any step.

        The encoder's input spec was fixed when the module was built (`input_spec`); here it is
        only compared with the data's.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            check_data_module(self.objectives, self.encoder, datamodule)

    @property
    def max_steps(self) -> int:
        """Optimizer steps of the whole run: `optimizer.max_steps`, else what the Trainer will take."""
        return self.optimizer_settings.max_steps or int(self.trainer.estimated_stepping_batches)

    def exported_encoder_prefix(self) -> str:
        """State-dict prefix of the exported encoder: the shared one, or an objective's (DINO's teacher)."""
        for name, objective in self.objectives.items():
            if objective.exported_encoder_prefix is not None:
                return f"objectives.{name}.{objective.exported_encoder_prefix}"
        return "encoder."

    def configure_model(self) -> None:
        """Under `FSDP2Strategy`, shard the encoder's blocks, the text tower's layers and the heads.

        Lightning calls this once the process group exists and before the optimizer is built,
        so the optimizer holds only this rank's shards.
        """
        strategy = self.trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy):
            return
        shard = partial(
            shard_module,
            mesh=strategy.data_parallel_mesh,
            mixed_precision=strategy.mixed_precision,
            reshard_after_forward=strategy.reshard_after_forward,
        )
        # The units are what a step calls: the encoder, and each objective (forward, plus the
        # hooks that run its heads or its own encoder copy).
        units = shard(self.encoder)
        for objective in self.objectives.values():
            units += shard(objective, extra_forward_methods=("encode", "update_validation"))
        logger.info("FSDP2: %d sharded units over %d ranks", units, strategy.world_size)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self, self.optimizer_settings, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        return [ResumableRNG()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # fm3d.load_encoder(x.ckpt) rebuilds the encoder from this (core's contract).
        checkpoint[CKPT_CONFIG_KEY] = self.encoder.config.to_dict()


def _split_output(output: EncoderOutput, sizes: list[int]) -> list[EncoderOutput]:
    """Split one encoder call over concatenated views back into one output per view."""
    if len(sizes) == 1:
        return [output]
    tokens = output.tokens.split(sizes)
    pooled = output.pooled.split(sizes)
    hidden = [h.split(sizes) for h in output.hidden]
    return [
        EncoderOutput(
            tokens=tokens[i],
            pooled=pooled[i],
            grid=output.grid,
            hidden=[h[i] for h in hidden],
            hidden_grids=list(output.hidden_grids),
        )
        for i in range(len(sizes))
    ]


class ResumableRNG(pl.Callback):
    """Saves the global RNG states in checkpoints and puts them back on resume.

    Lightning restores weights, optimizer, scheduler and loop counters, but not the global
    torch/numpy/python generators, which draw the train sampler's shuffle, the DataLoader
    worker seeds, random crops and dropout. Without them a resumed run diverges from an
    uninterrupted one. The states are applied when the checkpoint is loaded and again after
    the sanity check (which draws from the generators too), i.e. just before the first train
    batch is drawn. Resuming is exact from a checkpoint taken at an epoch boundary (the
    default `ModelCheckpoint` cadence); a mid-epoch checkpoint (e.g. SLURM preemption) replays
    that epoch's data from the start. Under DDP every rank gets rank 0's states.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "numpy_pos": int(numpy_state[2]),
            "numpy_has_gauss": int(numpy_state[3]),
            "numpy_cached_gaussian": float(numpy_state[4]),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict
        self._apply()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = None

    def _apply(self) -> None:
        if self._pending is None:
            return
        state = self._pending
        torch.set_rng_state(state["torch"])
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached_gaussian"])
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
