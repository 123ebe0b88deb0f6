"""InputSpec: validation, JSON round trip and the prepared-cache check."""

from __future__ import annotations

import json

import pytest

from fm3d.errors import Fm3dError
from fm3d.spec import InputSpec, InputSpecError


def test_round_trip_through_json_keeps_the_spec() -> None:
    spec = InputSpec((1.5, 1.5, 1.5), (-175, 250), (0, 1), "xyz", (96, 96, 96))
    back = InputSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.hu_window == (-175.0, 250.0) and back.image_size == (96, 96, 96)


@pytest.mark.parametrize(
    "changes",
    [
        {"target_spacing_mm": (0, 1, 1)},
        {"target_spacing_mm": (1, 1)},
        {"hu_window": (100, -100)},
        {"hu_window": (-1000.5, 1000)},
        {"hu_window": (-40000, 0)},
        {"intensity_range": (1, 1)},
        {"axis_order": "yxz"},
        {"image_size": (0, 64, 64)},
    ],
)
def test_malformed_specs_are_refused_with_an_fm3d_error(changes: dict) -> None:
    with pytest.raises(InputSpecError) as caught:
        InputSpec(**changes)
    assert isinstance(caught.value, Fm3dError) and isinstance(caught.value, ValueError)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(InputSpecError, match="hu_windw"):
        InputSpec.from_dict({"hu_windw": [0, 1]})


def test_a_wider_window_than_the_prepared_one_is_refused() -> None:
    prepared = InputSpec(hu_window=(-1000, 1000))
    InputSpec(hu_window=(-175, 250)).check_prepared(prepared, "cache")  # narrower: fine
    with pytest.raises(InputSpecError, match="--hu-window -1200 1200"):
        InputSpec(hu_window=(-1200, 1200)).check_prepared(prepared, "cache")


def test_a_different_spacing_from_the_prepared_one_is_refused() -> None:
    with pytest.raises(InputSpecError, match="prepared at"):
        InputSpec((1.5, 1.5, 1.5)).check_prepared(InputSpec((3.0, 1.5, 1.5)), "cache")
