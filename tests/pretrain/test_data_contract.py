"""What the PretrainModule asks of its data: the batch keys its objectives declare, and the input spec."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from fm3d.data.base import LoaderSettings
from fm3d.data.datamodule import CTDataModule
from fm3d.spec import InputSpec
from pretrain.data_contract import PretrainConfigError
from pretrain.module import PretrainModule
from pretrain.objectives.phenotype import PhenotypeObjective
from pretrain.objectives.voco import VoCoObjective

TINY = {"image_size": [16, 16, 16], "patch_size": [8, 8, 8], "depth": 2}


def _setup(module: PretrainModule, data: CTDataModule, tmp_path) -> None:
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **quiet,
    )
    trainer.fit(module, datamodule=data)


def _data(demo_cohort, **settings) -> CTDataModule:
    return CTDataModule(
        demo_cohort["cache"],
        views={"image": {"size": [16, 16, 16]}},
        loader=LoaderSettings(batch_size=2, num_workers=0),
        **settings,
    )


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        (
            functools.partial(VoCoObjective, version="v2"),
            r"^objective 'main' needs batch key 'voco_crops', which the data module does not serve "
            r"\(it serves \[.*'image'.*\]\); set data\.views\.voco \(fm3d\.data\.views\)$",
        ),
        (
            functools.partial(PhenotypeObjective, num_phenotypes=3),
            r"^objective 'main' needs batch key 'phenotype', .*; set data\.labels with a 'phenotype' column "
            r"listed in data\.label_columns$",
        ),
    ],
)
def test_a_data_module_that_does_not_serve_an_objective_is_refused(demo_cohort, tmp_path, objective, message):
    data = _data(demo_cohort, hu_window=(-175, 250))
    module = PretrainModule("vit3d_tiny", TINY, {"main": objective}, input_spec=data.input_spec)
    with pytest.raises(PretrainConfigError, match=message):
        _setup(module, data, tmp_path)


def test_the_encoder_is_built_with_the_spec_and_the_same_weights():
    spec = InputSpec((3.0, 2.0, 2.0), (-175.0, 250.0), (-1.0, 1.0), "zyx", (16, 16, 16))
    factory = {"phenotype": functools.partial(PhenotypeObjective, num_phenotypes=3)}
    torch.manual_seed(0)
    linked = PretrainModule("vit3d_tiny", TINY, factory, input_spec=spec)
    torch.manual_seed(0)
    stated = {"target_spacing_mm": [3, 2, 2], "hu_window": [-175, 250], "intensity_range": [-1, 1]}
    by_hand = PretrainModule("vit3d_tiny", {**TINY, **stated}, factory)
    config = linked.encoder.config
    assert (config.target_spacing_mm, config.hu_window, config.intensity_range) == (
        (3.0, 2.0, 2.0), (-175.0, 250.0), (-1.0, 1.0),
    )  # fmt: skip
    assert linked.hparams["input_spec"] == spec.to_dict()
    # Reading the family's config fields drew no random numbers: the weights are the hand-built ones.
    for (name, a), b in zip(linked.state_dict().items(), by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_an_encoder_override_that_contradicts_the_spec_is_refused():
    spec = InputSpec(hu_window=(-175.0, 250.0))
    factory = {"phenotype": functools.partial(PhenotypeObjective, num_phenotypes=3)}
    with pytest.raises(PretrainConfigError, match=r"model\.encoder_overrides\.hu_window .* drop hu_window"):
        PretrainModule("vit3d_tiny", {**TINY, "hu_window": [-1000, 1000]}, factory, input_spec=spec)


def test_a_module_built_without_the_data_spec_is_refused_at_setup(demo_cohort, tmp_path):
    data = _data(demo_cohort, hu_window=(-175, 250), labels=demo_cohort["labels"])
    width = data.num_phenotypes
    module = PretrainModule(
        "vit3d_tiny", TINY, {"p": functools.partial(PhenotypeObjective, num_phenotypes=width)}
    )
    with pytest.raises(
        PretrainConfigError, match=r"encoder's target_spacing_mm .* input_spec=datamodule\.input_spec"
    ):
        _setup(module, data, tmp_path)
