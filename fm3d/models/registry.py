"""The encoder registry: `create_encoder(name, **overrides)` over factories filled by a decorator.

Each family module registers its named sizes with `@register_encoder("vit3d_base")`. The
registry imports the modules in `FAMILY_MODULES` on first use, so a new family is one line
here plus its own module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from fm3d.cli_errors import did_you_mean
from fm3d.models.config import EncoderConfig, EncoderConfigError

FAMILY_MODULES: tuple[str, ...] = ("fm3d.models.vit3d", "fm3d.models.swin3d", "fm3d.models.resnet3d")

EncoderFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register `factory(**overrides) -> encoder` under `name` (a decorator)."""

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise EncoderConfigError(f"encoder name {name!r} is registered twice.")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_families() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def list_encoders() -> list[str]:
    """The registered encoder names, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build the encoder registered as `name`, with config fields replaced by `overrides`.

    Example: `create_encoder("vit3d_base", patch_size=(4, 16, 16), image_size=(32, 256, 256))`.
    """
    _load_families()
    if name not in _REGISTRY:
        hint = did_you_mean(str(name), _REGISTRY, quote="'")
        raise EncoderConfigError(
            f"unknown encoder {name!r}{hint}; known encoders: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name](**overrides)


def encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild an encoder from its `config.to_dict()` (as stored in config.json or a checkpoint)."""
    if not isinstance(config, dict):
        raise EncoderConfigError(f"an encoder config is a JSON object, not a {type(config).__name__}.")
    config = dict(config)
    name = config.pop("name", None)
    family = config.pop("family", None)
    _load_families()
    if family is not None and family not in EncoderConfig.families:
        hint = did_you_mean(str(family), EncoderConfig.families, quote="'")
        raise EncoderConfigError(
            f"unknown encoder family {family!r}{hint}; known families: "
            f"{', '.join(sorted(EncoderConfig.families))}."
        )
    if not name or not isinstance(name, str):
        raise EncoderConfigError(f"encoder config has no 'name' (family {family!r}); cannot rebuild it.")
    encoder = create_encoder(name, **config)
    built_family = type(encoder.config).family
    if family is not None and family != built_family:
        raise EncoderConfigError(f"encoder config names family {family!r}, but {name!r} is a {built_family}.")
    return encoder
