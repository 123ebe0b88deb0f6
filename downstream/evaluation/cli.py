"""`fm3d eval-encoders`: compare encoders on one suite of frozen-encoder protocols, with intervals.

    fm3d eval-encoders --config conf/eval/demo.yaml \
        --encoders pretrained=runs/demo/latest/export/encoder random=random:runs/demo/latest/export/encoder

writes `<runs_root>/eval/<name>/<timestamp>/` (`latest` points at it): results.md (the table),
results.csv, intervals.png, suite.json, details/ (per-class tables), and logs the figures and
files to an MLflow run of its own (experiment `eval/<name>`, the local store under the runs root
unless --tracking-uri names a server). Features and each (protocol, encoder)'s figures are kept
under the suite's `features_dir`, so a rerun only extracts and fits what changed (--recompute:
everything).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from transformers.utils import logging as hf_logging

from downstream.base import safe_name
from downstream.evaluation.config import SuiteConfig
from downstream.evaluation.report import markdown_report, write_report
from downstream.evaluation.suite import SuiteOutcome, evaluate_encoders
from fm3d.cli_errors import report
from fm3d.errors import Fm3dError
from fm3d.train.progress import is_terminal
from fm3d.train.runs import new_run_dir, point_latest
from fm3d.train.tracking import build_mlflow_logger, store_root

PROG = "fm3d eval-encoders"


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    about = "Evaluate frozen encoders side by side, with patient-level bootstrap intervals."
    parse = argparse.ArgumentParser(prog=PROG, description=about)
    parse.add_argument(
        "--config", required=True, type=Path, metavar="YAML", help="the suite (conf/eval/*.yaml)"
    )
    parse.add_argument(
        "--encoders", required=True, nargs="+", metavar="[LABEL=]SOURCE",
        help="export folder, .ckpt, peer weights, registry name (random init) or random:<one of those>; "
        "the first is the reference of the paired differences",
    )  # fmt: skip
    parse.add_argument(
        "--protocols", nargs="+", metavar="NAME", help="run only these of the suite's protocols"
    )
    parse.add_argument("--resamples", type=int, help="bootstrap resamples (default: the suite's, 1000)")
    parse.add_argument("--seed", type=int, help="the suite's seed (default: the config's)")
    parse.add_argument("--features-dir", type=Path, help="where features are cached (default: the config's)")
    parse.add_argument("--out", type=Path, help="run folder (default: <runs_root>/eval/<name>/<timestamp>)")
    parse.add_argument(
        "--runs-root", type=Path, default=Path("runs"), help="runs root and MLflow store (default: runs)"
    )
    parse.add_argument(
        "--tracking-uri", help="MLflow tracking server (default: the local store under --runs-root)"
    )
    parse.add_argument(
        "--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1 ..."
    )
    parse.add_argument(
        "--recompute",
        action="store_true",
        help="extract and fit everything again instead of reusing kept results",
    )
    parse.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    return parse


def log_to_mlflow(outcome: SuiteOutcome, run_dir: Path, runs_root: Path, tracking_uri: str | None,
                  files: list[Path]) -> str:  # fmt: skip
    """Log every figure (`<protocol>/<metric>/<encoder>`, its interval and difference) and the files."""
    experiment = f"eval/{outcome.config.name}"
    run_logger: MLFlowLogger = build_mlflow_logger(
        run_dir, experiment, store_root(run_dir, runs_root), tracking_uri, continue_run=False
    )
    client, run_id = run_logger.experiment, run_logger.run_id
    client.log_param(run_id, "encoders", " ".join(e["label"] for e in outcome.encoders)[:500])
    client.log_param(run_id, "seed", outcome.config.seed)
    client.log_param(run_id, "resamples", outcome.config.bootstrap.resamples)
    for row in outcome.table.iter_rows(named=True):
        key = f"{row['protocol']}/{safe_name(row['metric'])}/{safe_name(row['encoder'])}"
        for suffix, column in (
            ("", "value"),
            ("/ci_low", "ci_low"),
            ("/ci_high", "ci_high"),
            ("/diff", "diff"),
        ):
            value = row[column]
            if value is not None and math.isfinite(value):
                client.log_metric(run_id, key + suffix, float(value))
    for path in files:
        client.log_artifact(
            run_id,
            str(path),
            artifact_path=str(path.parent.relative_to(run_dir)) if path.parent != run_dir else None,
        )
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d eval-encoders`."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.no_progress or not is_terminal(sys.stdout):
        # Hugging Face's weight-loading bars (the CLIP text tower) are carriage-return bars:
        # noise between the plain progress lines of a log.
        hf_logging.disable_progress_bar()
    try:
        config = SuiteConfig.from_yaml(args.config)
        changes = {}
        if args.seed is not None:
            changes["seed"] = args.seed
        if args.features_dir is not None:
            changes["features_dir"] = args.features_dir
        if args.resamples is not None:
            changes["bootstrap"] = type(config.bootstrap)(args.resamples, config.bootstrap.confidence)
        config = type(config)(**{**config.__dict__, **changes})
        run_dir = args.out or new_run_dir(args.runs_root / "eval" / config.name)
        outcome = evaluate_encoders(
            config, args.encoders, run_dir / "work", protocols=args.protocols, device=args.device,
            show_progress=not args.no_progress, reuse=not args.recompute,
        )  # fmt: skip
    except Fm3dError as exc:
        return report(PROG, str(exc))
    files = write_report(outcome, run_dir)
    run_id = log_to_mlflow(outcome, run_dir, args.runs_root, args.tracking_uri, files)
    if args.out is None:
        point_latest(run_dir)
    print(markdown_report(outcome))
    timings = ", ".join(f"{k} {v:.1f}" for k, v in outcome.timings_s.items())
    print(
        f"{PROG}: wrote {run_dir} (results.md, results.csv, intervals.png, suite.json); "
        f"MLflow run {run_id}; seconds: {timings}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
