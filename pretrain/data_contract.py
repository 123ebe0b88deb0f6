"""What a PretrainModule asks of its data module, checked before the first step.

Each check refuses with one line that names the objective (or encoder field), what is wrong
and the data or model setting that fixes it:

- batch keys: every key an objective declares (`Objective.batch_keys`) must be served by the
  data module (`batch_keys`, with `setting_for(key)` naming what would serve a missing one);
- label sizes: `num_phenotypes` / `num_tasks` of an objective equal the label table's widths;
- text embeddings: an objective with a frozen text tower (`text_settings`) reads a cache made
  with exactly its settings (model files, pooling, length, prefix, ...);
- input spec: the encoder was built with the data's input spec (`PretrainModule(input_spec=...)`,
  which `fm3d pretrain` links from `data.input_spec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

import fm3d
from fm3d.errors import Fm3dError
from fm3d.spec import InputSpec

# Sizes an objective may need that only the data knows; checked against the data module.
DATA_SIZES = ("num_phenotypes", "num_tasks")


class PretrainConfigError(Fm3dError, ValueError):
    """A pretraining run is configured inconsistently (objectives, data, weights, checkpoints)."""


def spec_overrides(encoder: str, overrides: dict, spec: InputSpec, config_type: type | None = None) -> dict:
    """The spec's fields the encoder family's config has, as config overrides (JSON types).

    The family's config class is read from an encoder built on the meta device under a forked
    RNG: it costs no memory and draws no random numbers, so weight initialisation is unchanged.
    A family whose constructor reads tensor values (MONAI's Swin calls `.item()`) cannot be
    built on the meta device; it is built on the CPU instead, under the same forked RNG.
    """
    if config_type is None:
        with torch.random.fork_rng(devices=[]):
            try:
                with torch.device("meta"):
                    config_type = type(fm3d.create_encoder(encoder, **overrides).config)
            except (RuntimeError, NotImplementedError):
                config_type = type(fm3d.create_encoder(encoder, **overrides).config)
    fields = {f.name for f in dataclasses.fields(config_type)}
    return {key: value for key, value in spec.to_dict().items() if key in fields and value is not None}


def check_data_module(objectives: Mapping[str, nn.Module], encoder: nn.Module, datamodule: object) -> None:
    """Every check of the module docstring; a data module without a property skips its check."""
    served = getattr(datamodule, "batch_keys", None)
    if served is not None:
        _check_batch_keys(objectives, served, datamodule)
    _check_label_sizes(objectives, datamodule)
    _check_text_embeddings(objectives, datamodule)
    data_spec = getattr(datamodule, "input_spec", None)
    if data_spec is not None:
        _check_input_spec(encoder, data_spec)


def _check_batch_keys(objectives: Mapping[str, nn.Module], served: tuple[str, ...], datamodule) -> None:
    missing = [
        (name, key)
        for name, objective in objectives.items()
        for key in getattr(objective, "batch_keys", getattr(objective, "views", ("image",)))
        if key not in served
    ]
    if missing:
        name, key = missing[0]
        setting = datamodule.setting_for(key) if hasattr(datamodule, "setting_for") else "the data module"
        raise PretrainConfigError(
            f"objective {name!r} needs batch key {key!r}, which the data module does not serve "
            f"(it serves {sorted(served)}); set {setting}"
        )


def _check_text_embeddings(objectives: Mapping[str, nn.Module], datamodule) -> None:
    cache = getattr(datamodule, "text_embedding_cache", None)
    for name, objective in objectives.items():
        expected = getattr(objective, "text_settings", None)
        if expected is not None and cache is not None:
            try:
                cache.check_settings(expected)
            except Fm3dError as error:
                raise PretrainConfigError(f"objective {name!r}: {error}") from error


def _check_label_sizes(objectives: Mapping[str, nn.Module], datamodule) -> None:
    for name, objective in objectives.items():
        for size in DATA_SIZES:
            ours, theirs = getattr(objective, size, None), getattr(datamodule, size, None)
            if ours is None or theirs is None:
                continue
            if theirs == 0:
                raise PretrainConfigError(
                    f"objective {name!r} needs {size} from a label table, but the data module has "
                    "none; set data.labels to the parquet written by `fm3d ehr labels`"
                )
            if int(ours) != int(theirs):
                raise PretrainConfigError(
                    f"objective {name!r} has {size}={ours} but the data module's label table has "
                    f"{theirs}; set model.objectives.{name}.init_args.{size}: {theirs} in the config"
                )


def _check_input_spec(encoder: nn.Module, data_spec: InputSpec) -> None:
    config = encoder.config
    for key, value in spec_overrides("", {}, data_spec, type(config)).items():
        ours = getattr(config, key)
        if (list(ours) if isinstance(ours, tuple) else ours) != value:
            raise PretrainConfigError(
                f"the encoder's {key} is {ours} but the data's input spec says {value}; build the "
                "module with input_spec=datamodule.input_spec (`fm3d pretrain` links data.input_spec "
                "to model.input_spec)"
            )
