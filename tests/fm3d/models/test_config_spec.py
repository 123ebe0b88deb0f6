"""The input spec in every family's config: the same five fields as InputSpec, checked by it."""

from __future__ import annotations

import dataclasses

import pytest

from fm3d.models.config import EncoderConfig, EncoderConfigError, Swin3DConfig
from fm3d.models.registry import create_encoder, get_family, list_encoders, list_families
from fm3d.spec import InputSpec

SMALL = {"vit3d": {"depth": 1}, "swin3d": {}, "resnet3d_i3d": {"layers": (1, 1, 1, 1), "base_width": 8}}


def _config_classes() -> dict[str, type[EncoderConfig]]:
    return {family: get_family(family).config_class for family in list_families()}


def _family(name: str) -> str:
    return next(family for family in SMALL if name.startswith(family))


def test_every_family_has_the_spec_fields_under_input_specs_names():
    spec_fields = {f.name for f in dataclasses.fields(InputSpec)}
    for family, config_class in _config_classes().items():
        assert spec_fields <= {f.name for f in dataclasses.fields(config_class)}, family


@pytest.mark.parametrize("name", ["vit3d_tiny", "swin3d_tiny", "resnet3d_i3d"])
@pytest.mark.parametrize(
    "spec",
    [
        InputSpec((1.5, 1.5, 1.5), (-175, 250), (0, 1), "xyz", (64, 64, 64)),
        InputSpec((3.0, 1.0, 1.0), (-1000, 1000), (-1, 1), "zyx", None),  # None: "any size"
    ],
)
def test_create_encoder_takes_a_spec_and_gives_it_back(name, spec):
    encoder = create_encoder(name, **SMALL[_family(name)], **spec.to_dict())
    config = encoder.config
    if spec.image_size is None and type(config).image_size_required:
        # A ViT sizes its position table from image_size: "any size" keeps the configured one.
        assert config.input_spec == spec.replace(image_size=create_encoder(name, depth=1).config.image_size)
    else:
        assert config.input_spec == spec
    assert config.to_dict()["axis_order"] == spec.axis_order


def test_families_that_take_any_size_say_so_and_the_vit_does_not():
    assert [name for name in list_encoders() if name.startswith("vit3d")]
    assert {family: cls.image_size_required for family, cls in _config_classes().items()} == {
        "vit3d": True,
        "swin3d": False,
        "resnet3d_i3d": False,
    }


def test_a_swin_image_size_must_fit_its_stages():
    with pytest.raises(EncoderConfigError, match=r"image_size \(48, 64, 64\) is not divisible by 32"):
        Swin3DConfig(image_size=(48, 64, 64))
