"""`fm3d evaluate`: test a fine-tuned task and write its metrics table, detail tables and figures.

Takes the same arguments as `fm3d finetune test` (config, `--model.encoder`, `--ckpt_path`)
plus `--out DIR` (default `<run>/evaluation`, where the run is a new folder
`<runs_root>/<name>/<timestamp>` as for every command). Writes into DIR:

    metrics.md, metrics.csv      one row per headline metric (task, metric, value)
    <table>.csv                  detail tables (e.g. dice_per_class.csv)
    <figure>.png                 the task's figures (Dice per class, ROC, Kaplan-Meier, recall@K)

and logs the metrics and every file to an MLflow run of its own, tagged with the fit run whose
checkpoint it evaluates (`fm3d.fit_run_id`). Nothing of an earlier evaluation is overwritten.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import polars as pl
from lightning.pytorch.loggers import MLFlowLogger

from downstream.base import Evaluation, safe_name
from downstream.cli import build_cli
from fm3d.cli_errors import report
from fm3d.errors import Fm3dError
from fm3d.train.runs import unique_path

logger = logging.getLogger(__name__)


def metrics_table(evaluation: Evaluation) -> pl.DataFrame:
    """The headline metrics as a (task, metric, value) table."""
    return pl.DataFrame(
        {
            "task": [evaluation.task] * len(evaluation.metrics),
            "metric": list(evaluation.metrics),
            "value": [float(v) for v in evaluation.metrics.values()],
        },
        schema={"task": pl.String, "metric": pl.String, "value": pl.Float64},
    )


def to_markdown(table: pl.DataFrame, float_format: str = "{:.4f}") -> str:
    """A GitHub-flavoured markdown table."""

    def cell(value: Any) -> str:
        return float_format.format(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.iter_rows()]
    return "\n".join(lines) + "\n"


def write_evaluation(evaluation: Evaluation, figures: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the metrics table (markdown + CSV), detail tables (CSV) and figures (PNG); returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = metrics_table(evaluation)
    written = [out / "metrics.csv", out / "metrics.md"]
    table.write_csv(written[0])
    text = f"# {evaluation.task} evaluation\n\n" + to_markdown(table)
    for name, detail in evaluation.tables.items():
        written.append(out / f"{safe_name(name)}.csv")
        detail.write_csv(written[-1])
        text += f"\n## {name}\n\n" + to_markdown(detail)
    written[1].write_text(text)
    for name, figure in figures.items():
        path = out / f"{safe_name(name)}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def log_to_mlflow(run_logger: MLFlowLogger, evaluation: Evaluation, files: list[Path]) -> None:
    """Log the evaluation metrics (as `eval/<metric>`) and files (under `evaluation/`) to the MLflow run."""
    client, run_id = run_logger.experiment, run_logger.run_id
    for name, value in evaluation.metrics.items():
        if value == value:  # MLflow rejects NaN
            client.log_metric(run_id, f"eval/{safe_name(name)}", float(value))
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")


def _pop_option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


USAGE = """usage: fm3d evaluate --config conf/downstream/<task>.yaml [options]

Test a fine-tuned task on its test split and write metrics, detail tables and figures.

options:
  --config FILE          the task's YAML (names the task); repeatable
  --model.encoder X      export folder, .ckpt or registry name of the encoder
  --ckpt_path FILE       the fine-tuned checkpoint (e.g. runs/<task>/latest/checkpoints/best.ckpt)
  --out DIR              where the files go (default: <run folder>/evaluation)
  --name NAME            run name (default: the task); the run goes to <runs_root>/<name>/<timestamp>
  --runs_root DIR        folder of all runs and their MLflow store (default: runs)
  --tracking_uri URI     MLflow tracking server (default: sqlite:///<runs_root>/mlflow.db)
  --progress_every_s S   seconds between progress lines when stdout is not a terminal (default: 30)
  -h, --help             this message; with --config, every option of the task

Any other `fm3d finetune test` option (--data.*, --trainer.*) is passed through.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d evaluate`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    asks_help = any(arg in {"-h", "--help"} for arg in argv)
    if not argv or (asks_help and not any(a == "--config" or a.startswith("--config=") for a in argv)):
        print(USAGE, end="")
        return 0 if argv else 2
    out = _pop_option(argv, "--out")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        cli = build_cli(["test", *argv])
    except Fm3dError as exc:
        return report("fm3d evaluate", str(exc))
    if not cli.trainer.is_global_zero:
        return 0
    task = cli.model
    if task.evaluation is None:
        print("fm3d evaluate: the test split produced no evaluation (is it empty?)", file=sys.stderr)
        return 1
    out_dir = Path(out) if out else unique_path(Path(cli.trainer.default_root_dir) / "evaluation")
    files = write_evaluation(task.evaluation, task.figures(task.collected, task.evaluation), out_dir)
    if isinstance(cli.trainer.logger, MLFlowLogger):
        log_to_mlflow(cli.trainer.logger, task.evaluation, files)
    print(to_markdown(metrics_table(task.evaluation)))
    summary = cli.summary({"evaluation": out_dir}, metrics_file=out_dir / "metrics.csv")
    summary.command = "fm3d evaluate"
    print(summary.render())
    return 0
