"""fm3d.models.config_checks: wrong types and sizes named, absurd models refused before allocation."""

from __future__ import annotations

import pytest
from monai.networks.nets import SwinUNETR
from torch import nn

from fm3d import create_encoder
from fm3d.models.config import Swin3DConfig, ViT3DConfig
from fm3d.models.config_checks import MAX_PARAMS_ENV, EncoderConfigError, EncoderTooLargeError
from fm3d.models.registry import encoder_from_config


def _allocated(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("vit3d_tiny", {}),
        (
            "vit3d_tiny",
            {"pos_embed": "sincos", "qk_norm": True, "layer_scale_init": 1e-5, "cls_token": False},
        ),
        ("vit3d_small", {"image_size": (32, 128, 128), "patch_size": (4, 16, 16), "qkv_bias": False}),
        ("resnet3d_i3d", {"layers": (1, 2, 1, 1), "base_width": 8, "in_chans": 3}),
    ],
)
def test_estimate_matches_the_built_encoder(name, overrides):
    encoder = create_encoder(name, **overrides)
    assert encoder.config.estimated_parameters() == pytest.approx(_allocated(encoder), rel=1e-3)


@pytest.mark.parametrize(
    "overrides", [{"feature_size": 12}, {"feature_size": 24, "window_size": 4, "depths": (2, 2, 6, 2)}]
)
def test_swin_estimate_matches_what_monai_allocates(overrides):
    """Swin3D builds MONAI's whole SwinUNETR (decoder too) before keeping the encoder: that is the peak."""
    config = Swin3DConfig(name="swin", **overrides)
    full = SwinUNETR(
        in_channels=1, out_channels=1, patch_size=2, depths=config.depths, num_heads=config.num_heads,
        window_size=config.window_size, feature_size=config.feature_size, spatial_dims=3, use_v2=True,
    )  # fmt: skip
    assert config.estimated_parameters() == pytest.approx(_allocated(full), rel=0.01)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"embed_dim": "768"}, r"`embed_dim` must be int, got str '768'"),
        ({"patch_size": "16"}, r"`patch_size` must be tuple\[int, int, int\], got str"),
        ({"hu_window": ["low", 100]}, r"`hu_window` must be tuple\[float, float\]"),
        ({"qkv_bias": "yes"}, r"`qkv_bias` must be bool"),
        ({"depth": 2.5}, r"`depth` must be int, got float 2.5"),
        ({"layer_scale_init": "1e-5"}, r"`layer_scale_init` must be float \| None"),
        ({"pos_embed": "rope"}, r"`pos_embed` must be Literal\['sincos', 'learnable'\]"),
    ],
)
def test_wrong_types_are_named(overrides, named):
    with pytest.raises(EncoderConfigError, match=named):
        create_encoder("vit3d_tiny", **overrides)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"num_heads": 0}, r"`num_heads` = 0"),
        ({"depth": -1}, r"`depth` = -1"),
        ({"patch_size": (16, 0, 16)}, r"`patch_size` = \(16, 0, 16\)"),
        ({"mlp_ratio": 0.0}, r"`mlp_ratio` = 0\.0"),
    ],
)
def test_non_positive_sizes_are_named(overrides, named):
    with pytest.raises(EncoderConfigError, match=named + r".*finite numbers > 0"):
        create_encoder("vit3d_tiny", **overrides)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"hu_window": (100, -100)}, r"hu_window must be whole HU values \(low, high\), low < high"),
        ({"target_spacing_mm": (1.0, float("nan"), 1.0)}, r"target_spacing_mm must be 3 finite numbers"),
    ],
)
def test_the_input_spec_fields_are_checked_by_input_spec(overrides, named):
    # One check for the spec, InputSpec's, reported as a config error naming the encoder.
    with pytest.raises(EncoderConfigError, match=r"vit3d_tiny config: " + named):
        create_encoder("vit3d_tiny", **overrides)


@pytest.mark.parametrize(
    ("name", "overrides", "named"),
    [
        ("vit3d_base", {"depth": 100_000}, r"depth 100000"),
        ("vit3d_tiny", {"embed_dim": 3 * 2**20}, r"embed_dim 3145728"),
        (
            "vit3d_tiny",
            {"image_size": 4096, "patch_size": 4},
            r"1073741824 tokens from image_size \(4096, 4096, 4096\)",
        ),
        ("swin3d_tiny", {"window_size": 64}, r"window_size 64"),
        ("resnet3d_i3d", {"base_width": 4096}, r"base_width 4096"),
    ],
)
def test_absurd_models_are_refused_with_their_numbers(name, overrides, named):
    with pytest.raises(
        EncoderTooLargeError, match=rf"about [\d.e+]+ parameters \(.*{named}.*over the limit of 2e\+09"
    ):
        create_encoder(name, **overrides)


def test_the_limit_is_configurable(monkeypatch):
    monkeypatch.setenv(MAX_PARAMS_ENV, "1e6")
    with pytest.raises(EncoderTooLargeError, match=rf"over the limit of 1e\+06.*{MAX_PARAMS_ENV}"):
        create_encoder("vit3d_tiny")
    monkeypatch.setenv(MAX_PARAMS_ENV, "1e13")
    assert ViT3DConfig(depth=100_000).depth == 100_000  # allowed, and nothing is built by a config


def test_unknown_family_and_name_suggest_the_nearest():
    with pytest.raises(EncoderConfigError, match=r"unknown encoder family 'vit3dd' \(did you mean 'vit3d'"):
        encoder_from_config({"family": "vit3dd", "name": "vit3d_tiny"})
    with pytest.raises(
        EncoderConfigError, match=r"unknown encoder 'vit3d_tinny' \(did you mean 'vit3d_tiny'"
    ):
        encoder_from_config({"family": "vit3d", "name": "vit3d_tinny"})
    with pytest.raises(EncoderConfigError, match=r"a JSON object, not a list"):
        encoder_from_config(["vit3d_tiny"])
