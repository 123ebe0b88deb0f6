"""The encoder registry: names, overrides, errors, config round trips and family declarations."""

from __future__ import annotations

import json

import pytest
import torch

import fm3d
from fm3d.models import registry
from fm3d.models.config import EncoderConfigError, Swin3DConfig, ViT3DConfig
from fm3d.models.registry import (
    encoder_family,
    encoder_from_config,
    get_family,
    list_families,
    register_encoder,
)


def test_list_encoders_has_every_size():
    names = fm3d.list_encoders()
    for name in ("vit3d_tiny", "vit3d_small", "vit3d_base", "vit3d_large", "swin3d_tiny", "swin3d_base"):
        assert name in names
    assert names == sorted(names)


def test_every_builtin_family_module_is_found_and_declares_itself():
    # Found by scanning fm3d/models/families, not from a hand-kept list.
    assert list_families() == ["resnet3d_i3d", "swin3d", "vit3d"]
    vit, swin, resnet = get_family("vit3d"), get_family("swin3d"), get_family("resnet3d_i3d")
    assert (vit.decoder, swin.decoder, resnet.decoder) == ("unetr", "swin_unetr", None)
    assert vit.config_class is ViT3DConfig and swin.config_class is Swin3DConfig
    assert resnet.layer_id is None and resnet.lora_targets == ()
    small = {"vit3d_tiny": {}, "swin3d_tiny": {}, "resnet3d_i3d": {"layers": (1, 1, 1, 1), "base_width": 4}}
    for name, overrides in small.items():
        encoder = fm3d.create_encoder(name, **overrides).eval()
        family = encoder_family(encoder)
        with torch.no_grad():
            width = encoder(torch.zeros(1, 1, 64, 64, 64)).pooled.shape[1]
        assert family.width(encoder.config) == encoder.embed_dim == width, name
    assert encoder_family(torch.nn.Linear(2, 2)) is None


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(EncoderConfigError, match=r"'vit3e'.*mean 'vit3d'.*resnet3d_i3d, swin3d, vit3d"):
        get_family("vit3e")


@pytest.mark.parametrize(
    ("name", "dim", "depth", "heads"),
    [("vit3d_small", 384, 12, 6), ("vit3d_base", 768, 12, 12), ("vit3d_large", 1024, 24, 16)],
)
def test_vit_sizes(name, dim, depth, heads):
    # Built on the meta device: full size, no memory.
    with torch.device("meta"):
        enc = fm3d.create_encoder(name)
    assert enc.embed_dim == dim and enc.config.num_heads == heads and enc.config.depth == depth
    assert len(enc.blocks) == depth and enc.blocks[0].attn.head_dim == 64
    assert enc.config.patch_size == (16, 16, 16) and enc.config.image_size == (96, 96, 96)


def test_unknown_name_lists_known_names():
    with pytest.raises(EncoderConfigError, match="vit3d_base"):
        fm3d.create_encoder("vit3d_huge")


def test_unknown_override_names_valid_fields():
    with pytest.raises(EncoderConfigError, match="embed_dims"):
        fm3d.create_encoder("vit3d_tiny", embed_dims=3)


def test_overrides_reach_the_config():
    enc = fm3d.create_encoder("vit3d_tiny", patch_size=(4, 16, 16), image_size=(32, 256, 256), norm_eps=1e-5)
    assert enc.config.patch_size == (4, 16, 16) and enc.config.grid == (8, 16, 16)
    assert enc.norm.eps == 1e-5 and enc.config.name == "vit3d_tiny"


def test_bad_values_are_refused():
    with pytest.raises(EncoderConfigError, match="not divisible"):
        fm3d.create_encoder("vit3d_tiny", image_size=(100, 96, 96))
    with pytest.raises(EncoderConfigError, match="attention_backend"):
        fm3d.create_encoder("vit3d_tiny", attention_backend="flash")


@pytest.mark.parametrize("name", ["vit3d_tiny", "swin3d_tiny"])
def test_config_json_round_trip(name):
    enc = fm3d.create_encoder(name)
    data = json.loads(json.dumps(enc.config.to_dict()))
    assert data["family"] in ("vit3d", "swin3d")
    assert data["target_spacing_mm"] == [3.0, 1.5, 1.5] and data["hu_window"] == [-1000.0, 1000.0]
    cls = ViT3DConfig if data["family"] == "vit3d" else Swin3DConfig
    assert cls.from_dict(data) == enc.config
    assert encoder_from_config(data).config == enc.config


def test_config_of_another_family_is_refused():
    data = fm3d.create_encoder("vit3d_tiny").config.to_dict()
    with pytest.raises(EncoderConfigError, match="family"):
        Swin3DConfig.from_dict(data)


def test_double_registration_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_encoder("test_only_encoder")
    def first(**overrides):
        return fm3d.create_encoder("vit3d_tiny", **overrides)

    with pytest.raises(EncoderConfigError, match="twice"):

        @register_encoder("test_only_encoder")
        def second(**overrides):
            return first(**overrides)
