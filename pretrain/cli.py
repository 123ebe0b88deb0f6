"""`fm3d pretrain {fit,validate}`: pretrain an encoder (VoCo, report CLIP, phenotype, time-to-event).

    fm3d pretrain fit --config conf/pretrain/demo.yaml
    fm3d pretrain fit --config conf/pretrain/full.yaml --config conf/trainer/gpu.yaml --trainer.max_steps 1000
    fm3d pretrain fit --config conf/pretrain/demo.yaml --ckpt_path last     # resume the newest demo run
    fm3d pretrain fit --config conf/pretrain/demo.yaml --print_config       # the resolved config
    fm3d pretrain plan --config conf/recipes/merlin.yaml --volumes 15331 --gpu H100  # cost, no data

The run setup is `fm3d.train.cli.RunCLI` (shared with `fm3d finetune`): a run folder per run,
`<runs_root>/<name>/<timestamp>` (`<runs_root>/<name>/latest` points at the newest), holding
`config.yaml`, `checkpoints/last.ckpt` (always) and `checkpoints/best.ckpt` (lowest CLIP
validation loss, else total validation loss), `plots/`, `metrics.json` and `export/`; MLflow in
the project's store `<runs_root>/mlflow.db` (experiment `pretrain/<name>`); `--ckpt_path last`
resumes the newest run of that name. Pretraining adds atomic checkpoint writes and, at the end
of fit, `export/encoder` (fm3d.save_encoder) and `export/clip` when CLIP trains, both taken from
`best.ckpt` when there is one (`export/source.json` says which checkpoint, epoch and step).
The run-folder rules for SLURM, torchrun and spawned processes are in `fm3d.train.runs`.
"""

from __future__ import annotations

import sys
import warnings

from fm3d.cli_errors import report
from fm3d.errors import Fm3dError
from pretrain.callbacks import ExportEncoder
from pretrain.plan import main as plan
from pretrain.run_cli import PretrainCLI


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d pretrain`; ends with the run's summary (folder, checkpoints, export, MLflow)."""
    # `fm3d` hands over argv explicitly, which LightningCLI warns about when sys.argv has args.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["plan"]:
        return plan(args[1:])
    try:
        cli = PretrainCLI(args=argv)
    except Fm3dError as exc:
        return report("fm3d pretrain", str(exc))
    if cli.subcommand is None or not cli.trainer.is_global_zero:
        return 0
    summary = cli.summary()
    export = cli.run_dir / "export"
    if cli.subcommand == "fit":
        summary.exported = [export / name for name in ("encoder", "clip") if (export / name).is_dir()]
        source = ExportEncoder.read_source(export)
        summary.export_source = source
    print(summary.render())
    return 0
