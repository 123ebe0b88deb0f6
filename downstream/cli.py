"""`fm3d finetune {fit,validate,test,predict}`: LightningCLI over the registered downstream tasks.

The task name picks the LightningModule and its data module: `task: segmentation` in the YAML
(or `--task segmentation` on the command line); everything else is plain LightningCLI:

    fm3d finetune fit --config conf/downstream/segmentation.yaml --model.encoder runs/x/export/encoder

`--model.encoder` takes an export folder, a Lightning .ckpt or a registry name ("vit3d_tiny")
for a freshly created encoder. Unless the config names a logger, runs are tracked with MLflow
in an embedded SQLite store under the run folder (`<trainer.default_root_dir>/mlflow.db`,
artifacts in `<trainer.default_root_dir>/mlartifacts`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from downstream.base import EncoderSpecError
from downstream.data import TaskDataError
from downstream.registry import TaskRegistryError, get_task, list_tasks
from downstream.strategies import StrategyError
from downstream.tasks.causal_lm import LanguageModelError
from downstream.tasks.clip_task import LanguageTaskError
from downstream.tasks.decoders import DecoderConfigError
from downstream.tasks.projector import ProjectorConfigError
from downstream.tasks.prompts import PromptSetError
from fm3d.data.errors import CacheError
from fm3d.errors import Fm3dError

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
EXPERIMENT_NAME = "fm3d-downstream"


class FinetuneError(Fm3dError, RuntimeError):
    """A `fm3d finetune` invocation that cannot start (no task named, unreadable config)."""


# Failures that are the user's to fix (bad path, empty split, unknown encoder): printed as one
# line with the fix instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    FinetuneError,
    TaskDataError,
    CacheError,
    EncoderSpecError,
    StrategyError,
    DecoderConfigError,
    LanguageTaskError,
    PromptSetError,
    LanguageModelError,
    ProjectorConfigError,
)


def _option(argv: list[str], name: str) -> list[str]:
    """Every value given to `name` (`--name VALUE` or `--name=VALUE`), in order."""
    values = []
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
    return values


def task_name_from_args(argv: list[str]) -> str:
    """The task named by `--task`, or else by the `task:` key of the last config that has one."""
    names = _option(argv, "--task")
    if names:
        return names[-1]
    found = None
    for config in _option(argv, "--config"):
        path = Path(config)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise FinetuneError(f"cannot read the config {path} ({exc}); check the path") from exc
        if isinstance(data, dict) and "task" in data:
            found = str(data["task"])
    if found is None:
        raise FinetuneError(
            "no task named: put `task: <name>` in the --config YAML (see conf/downstream/) or pass "
            f"--task NAME; tasks: {list_tasks()}"
        )
    return found


def mlflow_logger_config(root_dir: str | Path, run_name: str | None = None) -> Namespace:
    """LightningCLI config of an MLFlowLogger with an embedded SQLite store under `root_dir`."""
    root = Path(root_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return Namespace(
        class_path="lightning.pytorch.loggers.MLFlowLogger",
        init_args=Namespace(
            experiment_name=EXPERIMENT_NAME,
            run_name=run_name,
            tracking_uri=f"sqlite:///{root / MLFLOW_DB}",
            artifact_location=(root / MLFLOW_ARTIFACTS).as_uri(),
        ),
    )


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as `<default_root_dir>/<subcommand>-config.yaml` and logs it to MLflow.

    Lightning's default writes into `trainer.log_dir`, which an MLflow logger with a SQLite store
    does not have.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{getattr(stage, 'value', stage)}-config.yaml"
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        if isinstance(trainer.logger, MLFlowLogger):
            trainer.logger.experiment.log_artifact(trainer.logger.run_id, str(path))


class FinetuneCLI(LightningCLI):
    """LightningCLI for one task class: accepts `--task`, links data to model arguments, adds MLflow."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--task", type=str, default=None, help="registered task name (see `list_tasks()`)"
        )
        for link in getattr(self.model_class, "cli_links", ()):
            if len(link) == 2:
                parser.link_arguments(*link)
            else:  # (source, target, compute_fn): computed from the instantiated data module
                parser.link_arguments(link[0], link[1], compute_fn=link[2], apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.logger is None or trainer.logger is True:
            root = trainer.default_root_dir or Path("runs") / "downstream" / self.model_class.task_name
            trainer.default_root_dir = str(root)
            trainer.logger = mlflow_logger_config(
                root, run_name=f"{self.model_class.task_name}-{self.subcommand}"
            )


def build_cli(argv: list[str], run: bool = True) -> FinetuneCLI:
    """Parse `argv` (subcommand first) for the task it names and run it; returns the CLI object."""
    try:
        task_cls = get_task(task_name_from_args(argv))
    except TaskRegistryError as exc:
        raise FinetuneError(str(exc)) from exc
    if task_cls.datamodule_class is None:
        raise FinetuneError(
            f"task {task_cls.task_name!r} declares no datamodule_class, so the CLI cannot feed it"
        )
    return FinetuneCLI(
        model_class=task_cls,
        datamodule_class=task_cls.datamodule_class,
        args=argv,
        run=run,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d finetune`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(
            "usage: fm3d finetune {fit,validate,test,predict} --config conf/downstream/<task>.yaml "
            "--model.encoder PATH|NAME [...]\n\n"
            f"tasks: {', '.join(list_tasks())}\n"
            "Run `fm3d finetune fit --config X --help` for every option of a task."
        )
        return 0 if argv else 2
    # `fm3d` hands us its own argv slice; LightningCLI would warn that sys.argv differs from it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        build_cli(argv)
    except USER_ERRORS as exc:
        print(f"fm3d finetune: {exc}", file=sys.stderr)
        return 2
    return 0
