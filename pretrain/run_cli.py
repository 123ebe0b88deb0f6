"""`PretrainCLI`: the LightningCLI of `fm3d pretrain fit|validate`, also used by `fm3d pretrain plan`.

The run setup is `fm3d.train.cli.RunCLI` (shared with `fm3d finetune`); this adds what pretraining
needs: atomic checkpoint writes, the encoder export, the training plots and the link that hands
the data's input spec to the model. `pretrain.cli.main` is the command.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

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
