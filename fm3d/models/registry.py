"""The encoder registry: families and their named sizes, found rather than listed.

A family module declares its `EncoderFamily` with `register_family` and its named sizes with
`@register_encoder("vit3d_base")`. The built-in families are the modules of
`fm3d.models.families`, all imported on first use, so a new family is one new file there;
a third-party package adds one through an entry point in the group `fm3d.encoders`
(`my_family = "my_package.my_family"` under `[project.entry-points."fm3d.encoders"]`), naming
the module whose import registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint
from typing import Any

from torch import nn

from fm3d.cli_errors import did_you_mean
from fm3d.models.config import EncoderConfigError
from fm3d.models.encoder import EncoderFamily
from fm3d.plugins import import_package_modules, load_entry_points

FAMILIES_PACKAGE = "fm3d.models.families"
ENTRY_POINT_GROUP = "fm3d.encoders"

EncoderFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, EncoderFactory] = {}
_FAMILIES: dict[str, EncoderFamily] = {}
_discovered = False


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register `factory(**overrides) -> encoder` under `name` (a decorator)."""

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise EncoderConfigError(f"encoder name {name!r} is registered twice.")
        _REGISTRY[name] = factory
        return factory

    return decorator


def register_family(family: EncoderFamily) -> EncoderFamily:
    """Declare an encoder family (see `EncoderFamily`); returns it, to keep beside its module's code."""
    existing = _FAMILIES.get(family.name)
    if existing is not None and existing.config_class is not family.config_class:
        raise EncoderConfigError(
            f"encoder family {family.name!r} is declared twice ({existing.config_class.__module__} and "
            f"{family.config_class.__module__}); give one of the config classes another `family`."
        )
    _FAMILIES[family.name] = family
    return family


def discover_families(found: Iterable[EntryPoint] | None = None) -> None:
    """Import the built-in family modules and those named by `fm3d.encoders` entry points.

    `found` replaces the installed entry points (tests); without it this runs once per process.
    """
    global _discovered
    if _discovered and found is None:
        return
    import_package_modules(FAMILIES_PACKAGE)
    load_entry_points(ENTRY_POINT_GROUP, found)
    _discovered = _discovered or found is None


def list_encoders() -> list[str]:
    """The registered encoder names, sorted."""
    discover_families()
    return sorted(_REGISTRY)


def list_families() -> list[str]:
    """The declared encoder family names, sorted."""
    discover_families()
    return sorted(_FAMILIES)


def get_family(name: str) -> EncoderFamily:
    """The declaration of the family `name`; an unknown name lists the known ones."""
    discover_families()
    if name not in _FAMILIES:
        hint = did_you_mean(str(name), _FAMILIES, quote="'")
        raise EncoderConfigError(
            f"unknown encoder family {name!r}{hint}; known families: {', '.join(sorted(_FAMILIES))}."
        )
    return _FAMILIES[name]


def encoder_family(encoder: nn.Module) -> EncoderFamily | None:
    """The declared family of an encoder module, by its config; None for a module of no family."""
    config = getattr(encoder, "config", None)
    name = getattr(type(config), "family", None)
    discover_families()
    return _FAMILIES.get(name) if isinstance(name, str) else None


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build the encoder registered as `name`, with config fields replaced by `overrides`.

    Example: `create_encoder("vit3d_base", patch_size=(4, 16, 16), image_size=(32, 256, 256))`.
    """
    discover_families()
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
    if family is not None:
        get_family(str(family))
    if not name or not isinstance(name, str):
        raise EncoderConfigError(f"encoder config has no 'name' (family {family!r}); cannot rebuild it.")
    encoder = create_encoder(name, **config)
    built_family = type(encoder.config).family
    if family is not None and family != built_family:
        raise EncoderConfigError(f"encoder config names family {family!r}, but {name!r} is a {built_family}.")
    return encoder
