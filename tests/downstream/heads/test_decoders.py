"""Segmentation decoders reproduce MONAI's UNETR and SwinUNETR exactly when given their weights;
the registry picks the encoder family's declared decoder or the one the task names."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR

import fm3d
from downstream.heads import decoders
from downstream.heads.decoders import (
    DecoderConfigError,
    SwinUNETRDecoder,
    UNETRDecoder,
    build_decoder,
    register_decoder,
    unetr_hidden_layers,
    upsampling_strides,
)
from fm3d.models.encoder import EncoderOutput


def test_unetr_decoder_equals_monai_unetr() -> None:
    torch.manual_seed(0)
    monai_net = UNETR(
        1, 3, img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=3
    ).eval()
    decoder = UNETRDecoder(
        embed_dim=48, depth=12, patch_size=(16, 16, 16), num_classes=3, feature_size=8
    ).eval()
    assert decoder.hidden_layers == [3, 6, 9]  # MONAI's hidden_states_out[3], [6], [9]
    ours_to_monai = {
        "input_skip": "encoder1", "hidden_skips.0": "encoder2", "hidden_skips.1": "encoder3",
        "hidden_skips.2": "encoder4", "up.0": "decoder5", "up.1": "decoder4", "up.2": "decoder3",
        "up.3": "decoder2", "out": "out",
    }  # fmt: skip
    monai_state = monai_net.state_dict()
    state = {}
    for name in decoder.state_dict():
        prefix = next(p for p in ours_to_monai if name.startswith(p + "."))
        state[name] = monai_state[ours_to_monai[prefix] + name[len(prefix) :]]
    decoder.load_state_dict(state)

    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        tokens, hidden = monai_net.vit(x)
        features = EncoderOutput(
            tokens, tokens.mean(1), (2, 2, 2), [hidden[i] for i in (3, 6, 9)], [(2, 2, 2)] * 3
        )
        torch.testing.assert_close(decoder(x, features), monai_net(x))


def test_swin_decoder_equals_monai_swinunetr() -> None:
    torch.manual_seed(0)
    monai_net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, use_v2=True).eval()
    encoder = fm3d.create_encoder("swin3d_tiny").eval()
    decoder, hidden_layers = build_decoder(encoder, num_classes=3)
    assert isinstance(decoder, SwinUNETRDecoder)
    monai_state = monai_net.state_dict()
    encoder.load_state_dict({k: monai_state[k] for k in encoder.state_dict()})
    decoder.load_state_dict({k: monai_state[k] for k in decoder.state_dict()})
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(decoder(x, encoder(x, hidden_layers=hidden_layers)), monai_net(x))


@pytest.mark.parametrize(
    ("patch", "img"), [((8, 8, 8), (32, 32, 32)), ((16, 16, 16), (32, 64, 64)), ((4, 16, 16), (16, 32, 32))]
)
def test_unetr_decoder_follows_any_power_of_two_patch(patch: tuple, img: tuple) -> None:
    encoder = fm3d.create_encoder(
        "vit3d_tiny", embed_dim=32, depth=4, num_heads=2, patch_size=patch, image_size=img
    )
    decoder, hidden_layers = build_decoder(encoder, num_classes=4, feature_size=4)
    x = torch.randn(2, 1, *img)
    assert decoder(x, encoder(x, hidden_layers=hidden_layers)).shape == (2, 4, *img)


def test_geometry_helpers() -> None:
    assert upsampling_strides((4, 16, 16)) == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert unetr_hidden_layers(depth=12, levels=4) == [3, 6, 9]
    assert unetr_hidden_layers(depth=4, levels=3) == [1, 2]
    with pytest.raises(DecoderConfigError, match="power-of-two"):
        upsampling_strides((6, 16, 16))


class PooledConv(torch.nn.Module):
    """A test decoder: a 1x1x1 convolution of the input, offset by a projection of the pooled embedding."""

    hidden_layers = ()

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, num_classes, 1)
        self.pooled = torch.nn.Linear(width, num_classes)

    def forward(self, image: torch.Tensor, features: EncoderOutput) -> torch.Tensor:
        return self.conv(image) + self.pooled(features.pooled)[:, :, None, None, None]


def test_a_registered_decoder_is_picked_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoders, "_DECODERS", dict(decoders._DECODERS))
    register_decoder("pooled_conv")(
        lambda encoder, num_classes, feature_size: PooledConv(encoder.embed_dim, num_classes)
    )
    assert {"pooled_conv", "swin_unetr", "unetr"} <= set(decoders.list_decoders())
    encoder = fm3d.create_encoder(
        "vit3d_tiny", embed_dim=32, depth=2, num_heads=2, patch_size=8, image_size=16
    )
    default, _ = build_decoder(encoder, num_classes=2)
    assert isinstance(default, UNETRDecoder)  # vit3d declares unetr
    decoder, hidden_layers = build_decoder(encoder, num_classes=2, name="pooled_conv")
    x = torch.randn(2, 1, 16, 16, 16)
    assert isinstance(decoder, PooledConv) and hidden_layers == []
    assert decoder(x, encoder(x, hidden_layers=hidden_layers)).shape == (2, 2, 16, 16, 16)


def test_decoder_choice_errors_name_the_way_out() -> None:
    resnet = fm3d.create_encoder("resnet3d_i3d", layers=(1, 1, 1, 1), base_width=4)
    with pytest.raises(
        DecoderConfigError,
        match=r"'resnet3d_i3d' declares no segmentation decoder; families with one: swin3d \(swin_unetr\), "
        r"vit3d \(unetr\).*model.decoder",
    ):
        build_decoder(resnet, num_classes=2)
    with pytest.raises(DecoderConfigError, match=r"unknown segmentation decoder 'unet'.*'unetr'"):
        build_decoder(resnet, num_classes=2, name="unet")
    with pytest.raises(DecoderConfigError, match=r"unetr decoder needs .*patch_size.*ResNet3DI3D"):
        build_decoder(resnet, num_classes=2, name="unetr")
    with pytest.raises(DecoderConfigError, match="already registered"):
        register_decoder("unetr")(lambda encoder, num_classes, feature_size: None)
