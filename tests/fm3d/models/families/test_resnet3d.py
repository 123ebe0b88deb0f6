"""resnet3d_i3d: Merlin's I3D ResNet geometry behind the encoder contract."""

from __future__ import annotations

import pytest
import torch

import fm3d
from fm3d.models.config import EncoderConfigError, EncoderInputError

TINY = {"layers": (1, 1, 1, 1), "base_width": 2}


def test_registered_with_merlins_defaults():
    assert "resnet3d_i3d" in fm3d.list_encoders()
    with torch.device("meta"):  # ResNet-152 has 117M parameters: check it without allocating them
        encoder = fm3d.create_encoder("resnet3d_i3d")
    config = encoder.config
    assert config.layers == (3, 8, 36, 3) and encoder.embed_dim == 2048
    assert config.target_spacing_mm == (3.0, 1.5, 1.5) and config.hu_window == (-1000.0, 1000.0)
    blocks = sum(1 for name in encoder.state_dict() if name.endswith("conv3.weight"))
    assert blocks == 50  # 3 + 8 + 36 + 3 bottlenecks
    assert tuple(encoder.conv1.weight.shape) == (64, 1, 3, 7, 7)


def test_merlin_training_size_gives_merlins_10x7x7_grid():
    # Merlin's report-generation code documents [B, 2048, 10, 7, 7] for its 160 x 224 x 224 input.
    encoder = fm3d.create_encoder("resnet3d_i3d", **TINY).eval()
    with torch.no_grad():
        out = encoder(torch.randn(1, 1, 160, 224, 224), hidden_layers=[0, 1, 2, 3])
    assert out.grid == (10, 7, 7)
    assert out.tokens.shape == (1, 490, encoder.embed_dim)
    assert out.hidden_grids == [(80, 56, 56), (40, 28, 28), (20, 14, 14), (10, 7, 7)]
    assert [h.shape[-1] for h in out.hidden] == [8, 16, 32, 64]
    torch.testing.assert_close(out.hidden[3], out.tokens)


def test_pooled_is_the_mean_of_the_tokens():
    encoder = fm3d.create_encoder("resnet3d_i3d", **TINY).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 1, 32, 64, 64))
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = fm3d.create_encoder("resnet3d_i3d", **TINY)
    checkpointed = fm3d.create_encoder("resnet3d_i3d", **TINY, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 32, 32)
    plain(x).pooled.sum().backward()
    checkpointed(x).pooled.sum().backward()
    torch.testing.assert_close(checkpointed.conv1.weight.grad, plain.conv1.weight.grad)


def test_save_and_load_round_trip(tmp_path):
    encoder = fm3d.create_encoder("resnet3d_i3d", **TINY).eval()
    again = fm3d.load_encoder(fm3d.save_encoder(encoder, tmp_path / "enc")).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x).tokens, encoder(x).tokens)
    assert again.config == encoder.config


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(EncoderConfigError, match="four block counts"):
        fm3d.create_encoder("resnet3d_i3d", layers=(1, 1, 1))
    encoder = fm3d.create_encoder("resnet3d_i3d", **TINY)
    with pytest.raises(EncoderInputError, match="B, C, D, H, W"):
        encoder(torch.randn(1, 32, 32, 32))
    with pytest.raises(EncoderConfigError, match=r"stages 0\.\.3"):
        encoder(torch.randn(1, 1, 16, 32, 32), hidden_layers=[4])
