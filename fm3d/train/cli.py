"""The LightningCLI base of `fm3d pretrain` and `fm3d finetune`: one run setup for both.

What it adds to LightningCLI (the layout is in `fm3d.train.runs`, the store in `fm3d.train.tracking`):
- `--name`, `--runs_root`, `--tracking_uri`, `--progress_every_s`;
- a run folder per command, `<runs_root>/<name>/<timestamp>`, with `<runs_root>/<name>/latest`
  pointing at the newest fit; `config.yaml` (the resolved config) inside it, never overwritten by
  another run; a missing `--ckpt_path` file refused in one line;
- MLflow into the project's store (experiment `<application>/<name>`); evaluate/predict runs
  are tagged with the fit run of the checkpoint they load;
- `checkpoints/last.ckpt` always, `checkpoints/best.ckpt` by the module's
  `checkpoint_monitor()`; progress lines when stdout is not a terminal; Lightning's adverts off;
- `summary()`: the block the command prints at the end (and `metrics.json` in the run folder).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from transformers.utils import logging as hf_logging

from fm3d.io import TORCH_READ_ERRORS, unreadable_checkpoint
from fm3d.train.checkpoints import CHECKPOINTS_DIR, LAST, best_checkpoint, checkpoint_callbacks
from fm3d.train.preemption import SlurmRequeue
from fm3d.train.progress import DEFAULT_EVERY_S, is_terminal
from fm3d.train.progress_bar import progress_callbacks
from fm3d.train.runs import (
    RUN_DIR_ENV,
    RunFolderError,
    check_ckpt_path,
    point_latest,
    resolve_run_dir,
    unique_path,
)
from fm3d.train.summary import METRICS_FILE, RunSummary, scalar_metrics, write_metrics
from fm3d.train.tracking import (
    build_mlflow_logger,
    fit_run_tags,
    local_tracking_uri,
    log_artifacts,
    mlflow_logger,
    remember_run_id,
    store_root,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# Lightning's rank-zero info lines that advertise its cloud products.
_ADVERT_PREFIX = "💡 Tip:"


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERT_PREFIX)


def silence_adverts() -> None:
    """Drop Lightning's product tips (litlogger, litmodels) from its rank-zero log lines."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in target.filters):
            target.addFilter(_NoAdverts())


class RunConfig(SaveConfigCallback):
    """Write the resolved config to `<run>/config.yaml` and log it to MLflow (artifact + params).

    A resumed fit writes over its own `config.yaml` (the same run continues); any other command
    pointed at a folder that already has one writes `config-2.yaml`, ... instead. A resumed run
    logs into the MLflow run it continues, where params cannot change value: only new keys are
    added, and the changed ones are recorded in the tag `fm3d.resume_overrides`.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / self.config_filename
        resuming = str(getattr(stage, "value", stage)) == "fit" and self.config.get("ckpt_path") is not None
        if not resuming:
            path = unique_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        log_artifacts(trainer, path)
        params = _flatten(self.config.as_dict(), skip=("trainer.callbacks",))
        tracker = mlflow_logger(trainer)
        if tracker is not None:
            logged = tracker.experiment.get_run(tracker.run_id).data.params
            changed = {key: value for key, value in params.items() if key in logged and logged[key] != value}
            params = {key: value for key, value in params.items() if key not in logged}
            if changed:
                overrides = json.dumps(changed)[:5000]
                tracker.experiment.set_tag(tracker.run_id, "fm3d.resume_overrides", overrides)
        for logger_ in trainer.loggers:
            if params:
                logger_.log_hyperparams(params)


def _flatten(tree: Mapping, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Nested config -> {"model.optimizer.lr": "0.001", ...} for MLflow params (strings <= 500 chars)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path in skip:
            continue
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{path}.", skip))
        else:
            flat[path] = (value if isinstance(value, str) else json.dumps(value, default=str))[:500]
    return flat


class RunCLI(LightningCLI):
    """LightningCLI with fm3d's run folders, MLflow store, checkpoints, progress and summary.

    Subclasses set `application` ("pretrain", "finetune"), may override `default_run_name()`
    and `run_callbacks()` (callbacks of their own, e.g. the encoder export), and pass the rest
    of LightningCLI's arguments through.
    """

    application = "run"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_dir: Path | None = None
        self.latest: Path | None = None
        self.tracking_uri: str | None = None
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("save_config_kwargs", {"config_filename": CONFIG_FILE, "save_to_log_dir": False})
        silence_adverts()
        if not is_terminal(sys.stdout):
            # Hugging Face's weight-loading bars (text tower, CLIP export) are carriage-return
            # bars: in a log file they are noise between the plain progress lines.
            hf_logging.disable_progress_bar()
        inherited = os.environ.get(RUN_DIR_ENV)
        try:
            super().__init__(*args, **kwargs)
        finally:
            # The run folder is handed to processes spawned during this run only, not to the
            # next run started from the same Python process.
            if inherited is None:
                os.environ.pop(RUN_DIR_ENV, None)
            else:
                os.environ[RUN_DIR_ENV] = inherited

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads `--ckpt_path`'s hyper-parameters here, before any trainer: name a bad file."""
        try:
            super()._parse_ckpt_path()
        except TORCH_READ_ERRORS as error:
            subcommand = self.config.get("subcommand")
            raise unreadable_checkpoint(self.config[subcommand].get("ckpt_path"), error) from error

    # ---- hooks for the applications --------------------------------------------------------
    def default_run_name(self) -> str:
        """The run name when `--name` is not given."""
        return self.application

    def run_callbacks(self) -> list[Callback]:
        """Callbacks the application adds to every run (after the checkpoints)."""
        return []

    # ---- LightningCLI hooks --------------------------------------------------------------------
    def active_config(self):
        """The config namespace of the running subcommand."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="run name: runs go to <runs_root>/<name>/<timestamp>",
        )
        parser.add_argument(
            "--runs_root", default="runs", help="folder of all runs and their MLflow store (mlflow.db)"
        )
        parser.add_argument(
            "--tracking_uri",
            type=str | None,
            default=None,
            help="MLflow tracking server URI; default: the SQLite store <runs_root>/mlflow.db",
        )
        parser.add_argument(
            "--progress_every_s",
            type=float,
            default=DEFAULT_EVERY_S,
            help="seconds between progress lines when stdout is not a terminal (a log file, SLURM, CI)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.active_config()
        ckpt_path = config.get("ckpt_path")
        check_ckpt_path(ckpt_path)
        name = config.name or self.default_run_name()
        config.name = name
        run_dir = resolve_run_dir(name, config.runs_root, config.trainer.default_root_dir, ckpt_path)
        config.trainer.default_root_dir = str(run_dir)
        if ckpt_path == "last":
            last = run_dir / CHECKPOINTS_DIR / f"{LAST}.ckpt"
            if not last.exists():  # a file, or a folder of shards (FSDP2's distributed checkpoint)
                raise RunFolderError(f"--ckpt_path last: {last} does not exist; nothing to resume")
            config.ckpt_path = str(last)
        # Processes Lightning spawns itself (DDP on one node) re-run this command: same folder.
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
        self.run_dir = run_dir
        # `latest` names the newest trained run (docs point at its checkpoints and export), so
        # an evaluate/predict run, which gets a folder of its own, does not move it.
        laid_out = Path(run_dir).resolve().parent == (Path(config.runs_root) / name).resolve()
        if laid_out and self.subcommand == "fit":
            self.latest = point_latest(run_dir)
        self.tracking_uri = config.tracking_uri or local_tracking_uri(store_root(run_dir, config.runs_root))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.active_config()
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            monitor = getattr(self.model, "checkpoint_monitor", lambda: None)()
            callbacks += checkpoint_callbacks(self.run_dir, monitor)
        callbacks += self.run_callbacks()
        if SLURMEnvironment.detect() and not trainer_config.get("plugins"):
            # fm3d's SlurmRequeue saves and requeues at a step all ranks reached; Lightning's
            # own handler does it inside the signal handler and can deadlock DDP.
            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
            callbacks.append(SlurmRequeue())
        enabled = trainer_config.get("enable_progress_bar") is not False
        kwargs["callbacks"] = progress_callbacks(callbacks, enabled, config.progress_every_s)
        if trainer_config.get("logger") in (None, True):
            fitting = self.subcommand == "fit"
            kwargs["logger"] = build_mlflow_logger(
                self.run_dir,
                f"{self.application}/{config.name}",
                store_root(self.run_dir, config.runs_root),
                config.tracking_uri,
                tags=None if fitting else fit_run_tags(config.get("ckpt_path")),
                continue_run=fitting,
            )
        # RunConfig logs the whole resolved config; Lightning's own hparam logging would log a
        # second, partial copy and fail on a resumed MLflow run whose values changed.
        kwargs["enable_autolog_hparams"] = False
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            remember_run_id(trainer, self.run_dir)
        return trainer

    # ---- the end ---------------------------------------------------------------------------------
    def summary(self, outputs: dict[str, Path] | None = None, metrics_file: Path | None = None) -> RunSummary:
        """Describe where everything went; the final scalar metrics go to `<run>/metrics.json`
        unless the command wrote its own `metrics_file` (e.g. `evaluation/metrics.csv`)."""
        trainer, run_dir = self.trainer, Path(self.run_dir)
        if metrics_file is None:
            metrics = scalar_metrics(trainer.callback_metrics)
            if metrics:
                metrics_file = write_metrics(unique_path(run_dir / METRICS_FILE), metrics)
                log_artifacts(trainer, metrics_file)
        tracker = mlflow_logger(trainer)
        summary = RunSummary(
            command=f"fm3d {self.application} {self.subcommand}",
            run_dir=run_dir,
            latest=self.latest,
            outputs=dict(outputs or {}),
            metrics_file=metrics_file,
            tracking_uri=self.tracking_uri if tracker is not None else None,
            run_id=tracker.run_id if tracker is not None else None,
        )
        if self.subcommand == "fit":
            last = run_dir / CHECKPOINTS_DIR / f"{LAST}.ckpt"
            summary.last = last if last.exists() else None
            best = best_checkpoint(trainer)
            if best is not None:
                summary.best = (
                    f"{best.path.resolve()}  ({best.monitor} {best.score:.4g} at epoch {best.epoch}, "
                    f"step {best.step})"
                )
        return summary
