"""`fm3d finetune {fit,validate,test,predict}`: fine-tune an encoder on a downstream task (LightningCLI).

The task name picks the LightningModule and its data module: `task: segmentation` in the YAML
(or `--task segmentation` on the command line); everything else is plain LightningCLI:

    fm3d finetune fit --config conf/downstream/segmentation.yaml --model.encoder runs/x/export/encoder

`--model.encoder` takes an export folder, a Lightning .ckpt or a registry name ("vit3d_tiny")
for a freshly created encoder. The run setup is `fm3d.train.cli.RunCLI`, shared with
`fm3d pretrain`: every command gets a run folder `<runs_root>/<name>/<timestamp>` (name: the
task, or `--name`; `<runs_root>/<name>/latest` points at the newest) with `config.yaml`,
`checkpoints/last.ckpt` (always) and `checkpoints/best.ckpt` (lowest validation loss), and
`predictions/predictions.parquet` for predict; MLflow goes to the project's store
`<runs_root>/mlflow.db` (experiment `finetune/<name>`), and a test/predict run is tagged with
the fit run whose `--ckpt_path` it loads. Every command ends with a summary of where it wrote.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import polars as pl
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from downstream.registry import get_task, list_tasks
from fm3d.cli_errors import report
from fm3d.errors import Fm3dError
from fm3d.parsing import ArgumentParser
from fm3d.train.cli import RunCLI

PREDICTIONS_DIR = "predictions"


class FinetuneError(Fm3dError, RuntimeError):
    """A `fm3d finetune` invocation that cannot start (no task named, unreadable config)."""


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


class PredictionTable(BasePredictionWriter):
    """Write what `predict_step` returned to `<run>/predictions/predictions.parquet`, one row per study.

    A dict of per-study values (lists, or tensors whose first dimension is the batch) becomes
    columns; a list of written files (segmentation's label maps) becomes a `file` column.
    Under DDP each rank writes `predictions-rank<r>.parquet`.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.written: Path | None = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices
    ) -> None:
        # One list of batch outputs, or one such list per dataloader when there are several.
        several = len(trainer.num_predict_batches) > 1
        outputs = [output for loader in predictions for output in loader] if several else predictions
        rows = [row for output in outputs for row in _rows(output)]
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = Path(trainer.default_root_dir) / PREDICTIONS_DIR / f"predictions{suffix}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(rows).write_parquet(path)
        self.written = path


def _rows(output: Any) -> list[dict[str, Any]]:
    """One batch's `predict_step` output as per-study rows."""
    if isinstance(output, dict):
        columns = {
            key: value.detach().cpu().tolist() if isinstance(value, torch.Tensor) else list(value)
            for key, value in output.items()
        }
        size = len(next(iter(columns.values()), []))
        return [{key: values[i] for key, values in columns.items()} for i in range(size)]
    return [{"file": str(item)} for item in output]


class FinetuneCLI(RunCLI):
    """The shared run setup for one task class: accepts `--task`, links data to model arguments."""

    application = "finetune"

    def default_run_name(self) -> str:
        return self.model_class.task_name

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--task", type=str, default=None, help="registered task name (see `list_tasks()`)"
        )
        for link in getattr(self.model_class, "cli_links", ()):
            if len(link) == 2:
                parser.link_arguments(*link)
            else:  # (source, target, compute_fn): computed from the instantiated data module
                parser.link_arguments(link[0], link[1], compute_fn=link[2], apply_on="instantiate")

    def run_callbacks(self) -> list[Callback]:
        return [PredictionTable()] if self.subcommand == "predict" else []

    def predictions_file(self) -> Path | None:
        """The table `predict` wrote, if it ran."""
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionTable)), None)
        return writer.written if writer is not None else None


def build_cli(argv: list[str], run: bool = True) -> FinetuneCLI:
    """Parse `argv` (subcommand first) for the task it names and run it; returns the CLI object."""
    task_cls = get_task(task_name_from_args(argv))
    if task_cls.datamodule_class is None:
        raise FinetuneError(
            f"task {task_cls.task_name!r} declares no datamodule_class, so the CLI cannot feed it"
        )
    return FinetuneCLI(
        model_class=task_cls,
        datamodule_class=task_cls.datamodule_class,
        args=argv,
        run=run,
        auto_configure_optimizers=False,
        parser_class=ArgumentParser,
        parser_kwargs={"prog": "fm3d finetune"},
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
        cli = build_cli(argv)
    except Fm3dError as exc:
        return report("fm3d finetune", str(exc))
    if cli.subcommand is None or not cli.trainer.is_global_zero:
        return 0
    predictions = cli.predictions_file() if cli.subcommand == "predict" else None
    outputs = {"predictions": predictions} if predictions is not None else {}
    print(cli.summary(outputs).render())
    return 0
