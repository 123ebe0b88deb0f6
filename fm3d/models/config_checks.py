"""Checks every encoder config passes before allocation: field types, positive sizes, a size budget.

A config comes from files fm3d does not control (a downloaded export's config.json, a
checkpoint's `fm3d_encoder_config`, shapes read from a peer's weights), so a wrong type must
be named rather than surface as a torch traceback, and a config that would build an absurd
model (a width, depth or grid of billions) must be refused before the allocation that would
exhaust the machine's memory. The budget is `FM3D_MAX_ENCODER_PARAMS` elements (parameters
and buffers), 2e9 by default: about twice the largest published 3D encoders in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from typing import Any, Literal, Union

from fm3d.errors import Fm3dError

MAX_PARAMS_ENV = "FM3D_MAX_ENCODER_PARAMS"
DEFAULT_MAX_PARAMS = 2_000_000_000


class EncoderConfigError(Fm3dError, ValueError):
    """A configuration value or override that cannot build an encoder."""


class EncoderTooLargeError(EncoderConfigError):
    """A config whose encoder would exceed the parameter budget (refused before allocation)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 3.0 as 3: an int is a valid float, True is not a number
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        if args and all(arg is int for arg in args) and _matches(value, int):
            return True  # (D, H, W) sizes accept one int for all three axes
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(
            _matches(item, arg) for item, arg in zip(value, args, strict=True)
        )
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    return (
        getattr(hint, "__name__", None)
        if typing.get_origin(hint) is None
        else str(hint).replace("typing.", "")
    )


def check_field_types(config: Any) -> None:
    """Raise EncoderConfigError naming every field whose value has the wrong type (e.g. "768" for an int)."""
    hints = _hints(type(config))
    wrong = [
        f"`{f.name}` must be {_describe(hints[f.name])}, got {type(value).__name__} {value!r}"
        for f in dataclasses.fields(config)
        if not _matches(value := getattr(config, f.name), hints[f.name])
    ]
    if wrong:
        raise EncoderConfigError(f"{config.name or config.family} config: {'; '.join(wrong)}.")


def check_positive(config: Any, names: tuple[str, ...]) -> None:
    """Raise EncoderConfigError for every named size (or size tuple) that is not a finite number > 0."""
    bad = []
    for name in names:
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else (value,)
        if not items or not all(math.isfinite(v) and v > 0 for v in items):
            bad.append(f"`{name}` = {value!r}")
    if bad:
        raise EncoderConfigError(
            f"{config.name or config.family} config: {', '.join(bad)}; sizes must be finite numbers > 0."
        )


def max_parameters() -> int:
    """The parameter budget: `FM3D_MAX_ENCODER_PARAMS`, or 2e9."""
    text = os.environ.get(MAX_PARAMS_ENV)
    if not text:
        return DEFAULT_MAX_PARAMS
    try:
        return int(float(text))
    except ValueError as error:
        raise EncoderConfigError(f"{MAX_PARAMS_ENV}={text!r} is not a number of parameters.") from error


def check_budget(config: Any, estimate: int, parts: str) -> None:
    """Refuse a config whose estimated element count exceeds the budget, naming the numbers and the limit."""
    limit = max_parameters()
    if estimate > limit:
        raise EncoderTooLargeError(
            f"{config.name or config.family} config would build about {estimate:.3g} parameters ({parts}), "
            f"over the limit of {limit:.3g}; nothing was allocated. A config from an untrusted file may "
            f"be corrupt; if the model is really that large, raise the limit with {MAX_PARAMS_ENV}."
        )
