"""`fm3d pretrain {fit,validate}`: LightningCLI over the PretrainModule and the CT data module.

    fm3d pretrain fit --config conf/pretrain/demo.yaml
    fm3d pretrain fit --config conf/pretrain/full.yaml --config conf/trainer/gpu.yaml --trainer.max_steps 1000
    fm3d pretrain fit --config conf/pretrain/demo.yaml --ckpt_path last     # resume the newest demo run
    fm3d pretrain fit --config conf/pretrain/demo.yaml --print_config       # the resolved config

What this adds to LightningCLI's defaults:
- a run folder per run, `<runs_root>/<name>/<timestamp>` (or `--trainer.default_root_dir`),
  holding `config.yaml`, `checkpoints/`, `mlflow.db` + `mlartifacts/`, `plots/`, `export/`;
- MLflow tracking into that folder (`--tracking_uri` for a server), atomic checkpoint writes,
  `checkpoints/last.ckpt` every epoch, and `--ckpt_path last` finding the newest run's last.ckpt;
- at the end of fit, `export/encoder` (fm3d.save_encoder) and `export/clip` when CLIP trains.

All ranks of a multi-process run must agree on the run folder: it comes from
`--trainer.default_root_dir`, else `$FM3D_RUN_DIR`, else the SLURM job id
(`<name>/slurm-<jobid>`, stable across requeues), else torchrun's `--rdzv-id`, else a
timestamp that is handed to processes Lightning spawns through `$FM3D_RUN_DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from pretrain.callbacks import ExportEncoder, TrainingPlots
from pretrain.checkpoint_io import AtomicCheckpointIO
from pretrain.module import PretrainConfigError, PretrainModule
from pretrain.tracking import (
    build_mlflow_logger,
    local_tracking_uri,
    log_artifacts,
    mlflow_logger,
    remember_run_id,
)

logger = logging.getLogger(__name__)

RUN_DIR_ENV = "FM3D_RUN_DIR"


def resolve_run_dir(
    name: str,
    runs_root: str | Path,
    default_root_dir: str | Path | None = None,
    ckpt_path: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """The run folder, the same on every rank of one run (see the module docstring for the order).

    With `ckpt_path="last"` and no explicit folder, the newest run of that name that has a
    `checkpoints/last.ckpt` is resumed.
    """
    if default_root_dir is not None:
        return Path(default_root_dir)
    if environ.get(RUN_DIR_ENV):
        return Path(environ[RUN_DIR_ENV])
    base = Path(runs_root) / name
    if ckpt_path == "last":
        candidates = sorted(base.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise PretrainConfigError(
                f"--ckpt_path last: no earlier run of {name!r} has a checkpoints/last.ckpt under {base}; "
                "pass --trainer.default_root_dir <run folder> or a checkpoint file"
            )
        return candidates[-1].parent.parent
    if environ.get("SLURM_JOB_ID"):
        return base / f"slurm-{environ['SLURM_JOB_ID']}"
    if environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return base / environ["TORCHELASTIC_RUN_ID"]
    return base / time.strftime("%Y%m%d-%H%M%S")


class TrackedConfig(SaveConfigCallback):
    """Write the resolved config to `<run>/config.yaml` and log it to MLflow (artifact + params).

    A resumed run logs into the MLflow run it continues, where params cannot change value:
    only new keys are added, and the changed ones are recorded in the tag
    `fm3d.resume_overrides` (the artifact `config.yaml` always holds the latest config).
    """

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        log_artifacts(trainer, path)
        remember_run_id(trainer, trainer.default_root_dir)
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


class PretrainCLI(LightningCLI):
    """LightningCLI with fm3d's run folder, MLflow tracking, atomic checkpoints and export."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        from fm3d.data.datamodule import CTDataModule

        self.run_dir: Path | None = None
        self.tracking_uri: str | None = None
        super().__init__(
            model_class=PretrainModule,
            datamodule_class=CTDataModule,
            save_config_callback=TrackedConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": "fm3d pretrain",
                "description": "Pretrain an fm3d encoder (VoCo, CT-report CLIP, phenotype, time-to-event).",
            },
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """`fit` and `validate` only: a pretraining module has no test or predict step."""
        kept = ("fit", "validate")
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in kept}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", default="pretrain", help="run name: runs go to <runs_root>/<name>/")
        parser.add_argument("--runs_root", default="runs", help="folder holding one subfolder per run name")
        parser.add_argument(
            "--tracking_uri",
            type=str | None,
            default=None,
            help="MLflow tracking server URI; default: an SQLite store inside the run folder",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = resolve_run_dir(
            config.name, config.runs_root, config.trainer.default_root_dir, config.get("ckpt_path")
        )
        config.trainer.default_root_dir = str(run_dir)
        if config.get("ckpt_path") == "last":
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise PretrainConfigError(f"--ckpt_path last: {last} does not exist; nothing to resume")
            config.ckpt_path = str(last)
        # Processes Lightning spawns itself (DDP on one node) re-run this command: same folder.
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
        self.run_dir = run_dir
        self.tracking_uri = config.tracking_uri

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # One file, checkpoints/last.ckpt, rewritten (atomically) at every epoch end:
            # pretraining has no validation score to keep a "best" by. (save_last=True with
            # save_top_k=0 would write last.ckpt only at the end of fit.)
            checkpoints = ModelCheckpoint(
                dirpath=self.run_dir / "checkpoints",
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
            )
            callbacks.append(checkpoints)
        callbacks += [ExportEncoder(), TrainingPlots(), LearningRateMonitor(logging_interval="step")]
        kwargs["callbacks"] = callbacks
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = build_mlflow_logger(self.run_dir, config.name, self.tracking_uri)
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        # TrackedConfig logs the whole resolved config; Lightning's own hparam logging would log
        # a second, partial copy and fail on a resumed MLflow run whose values changed.
        kwargs["enable_autolog_hparams"] = False
        return super().instantiate_trainer(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d pretrain`; prints where the run went and its final metrics."""
    # `fm3d` hands over argv explicitly, which LightningCLI warns about when sys.argv has args.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    inherited = os.environ.get(RUN_DIR_ENV)
    try:
        cli = PretrainCLI(args=argv)
    finally:
        # The run folder is handed to processes spawned during this run only, not to the next
        # run started from the same Python process.
        if inherited is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = inherited
    if cli.subcommand is None or not cli.trainer.is_global_zero:
        return 0
    uri = cli.tracking_uri or local_tracking_uri(cli.run_dir)
    print(f"run folder: {cli.run_dir.resolve()}")
    print(f"MLflow:     {uri}  (browse: mlflow ui --backend-store-uri {uri})")
    if cli.subcommand == "fit" and (cli.run_dir / "export" / "encoder").is_dir():
        print(f"encoder:    {(cli.run_dir / 'export' / 'encoder').resolve()}")
    metrics = {k: float(v) for k, v in sorted(cli.trainer.callback_metrics.items()) if v.numel() == 1}
    if metrics:
        print("final metrics:")
        for key, value in metrics.items():
            print(f"  {key:40s} {value:.4f}")
    return 0
