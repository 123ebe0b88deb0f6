"""Swin3D against MONAI's own SwinUNETR forward: same tokens and the same skip maps its decoder uses."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

import fm3d
from fm3d.models.config import EncoderInputError
from fm3d.models.registry import encoder_family


def test_matches_monai_swinunetr_encoder_path():
    torch.manual_seed(0)
    encoder = fm3d.create_encoder("swin3d_tiny").eval()
    assert encoder.embed_dim == 16 * 12
    monai_net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_v2=True).eval()
    result = monai_net.load_state_dict(encoder.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("decoder", "out.")) for k in result.missing_keys)

    # Capture what MONAI's real forward feeds its decoders: (deep input, skip map) per stage.
    seen = {}
    for name in ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1"):
        getattr(monai_net, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, args)
        )
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        monai_net(x)
        out = encoder(x, hidden_layers=range(5))

    assert out.grid == (2, 2, 2) and out.tokens.shape == (1, 8, 192) and out.pooled.shape == (1, 192)
    torch.testing.assert_close(out.tokens, seen["decoder5"][0].flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))
    skips = [seen[n][1] for n in ("decoder1", "decoder2", "decoder3", "decoder4", "decoder5")]
    assert out.hidden_grids == [(64, 64, 64), (32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]
    for index, (hidden, skip) in enumerate(zip(out.hidden, skips, strict=True)):
        assert hidden.shape == (1, skip[0, 0].numel(), skip.shape[1])
        torch.testing.assert_close(hidden, skip.flatten(2).transpose(1, 2), msg=f"skip {index}")


def test_keeps_monai_module_names():
    # swin3d_base differs only in feature_size (48); building it costs ~10 s, so names are checked on tiny.
    tiny = fm3d.create_encoder("swin3d_tiny")
    family = encoder_family(tiny)
    assert tiny.config.use_v2 and family.depth(tiny.config) == 4
    names = {name.split(".")[0] for name, _ in tiny.named_parameters()}
    assert names == {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"}
    assert any(name.startswith("swinViT.layers1c.") for name, _ in tiny.named_parameters())  # v2 blocks
    assert family.layer_id("swinViT.patch_embed.proj.weight", 4) == 0
    assert family.layer_id("swinViT.layers3.0.blocks.0.attn.qkv.weight", 4) == 3
    assert family.layer_id("encoder10.layer.conv1.conv.weight", 4) == 5


def test_input_not_divisible_by_32_is_a_clear_error():
    encoder = fm3d.create_encoder("swin3d_tiny")
    with pytest.raises(EncoderInputError, match="divisible by 32"):
        encoder(torch.randn(1, 1, 48, 64, 64))
