"""`fm3d pretrain {fit,validate}`: pretrain an encoder (VoCo, report CLIP, phenotype, time-to-event).

    fm3d pretrain fit --config conf/pretrain/demo.yaml
    fm3d pretrain fit --config conf/pretrain/full.yaml --config conf/trainer/gpu.yaml --trainer.max_steps 1000
    fm3d pretrain fit --config conf/pretrain/demo.yaml --ckpt_path last     # resume the newest demo run
    fm3d pretrain fit --config conf/pretrain/demo.yaml --print_config       # the resolved config

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

import warnings

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from fm3d.cli_errors import report
from fm3d.errors import Fm3dError
from fm3d.parsing import ArgumentParser
from fm3d.train.cli import RunCLI
from pretrain.callbacks import ExportEncoder, TrainingPlots
from pretrain.checkpoint_io import AtomicCheckpointIO
from pretrain.module import PretrainModule


class PretrainCLI(RunCLI):
    """The shared run setup plus atomic checkpoints, the encoder export and the training plots."""

    application = "pretrain"

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        from fm3d.data.datamodule import CTDataModule

        super().__init__(
            model_class=PretrainModule,
            datamodule_class=CTDataModule,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_class=ArgumentParser,
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

    def add_arguments_to_parser(self, parser) -> None:
        """The run options, and the data's input spec handed to the model when both are built.

        The encoder is built with the spec's spacing, window, intensity range and input size
        as config fields (`PretrainModule(input_spec=...)`), so the weights never travel
        without the preprocessing they were trained with.
        """
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.input_spec", "model.input_spec", apply_on="instantiate")

    def run_callbacks(self) -> list[Callback]:
        return [ExportEncoder(), TrainingPlots(), LearningRateMonitor(logging_interval="step")]

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d pretrain`; ends with the run's summary (folder, checkpoints, export, MLflow)."""
    # `fm3d` hands over argv explicitly, which LightningCLI warns about when sys.argv has args.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
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
