"""ViT3D: shapes on several crop sizes, position embeddings, hidden states, checkpointing."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

import fm3d
from fm3d.models.config import EncoderConfigError, EncoderInputError
from fm3d.models.pos_embed import resize_pos_embed, sincos_pos_embed_3d
from fm3d.models.registry import encoder_family


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return fm3d.create_encoder("vit3d_tiny").eval()


def test_tiny_runs_on_two_crop_sizes_unchanged(tiny):
    with torch.no_grad():
        out = tiny(torch.randn(2, 1, 64, 64, 64))
        assert out.grid == (4, 4, 4)
        assert out.tokens.shape == (2, 64, 192) and out.pooled.shape == (2, 192)
        assert out.hidden == [] and out.hidden_grids == []
        out = tiny(torch.randn(1, 1, 32, 96, 96))
    assert out.grid == (2, 6, 6)
    assert out.tokens.shape == (1, 72, tiny.embed_dim)
    assert torch.isfinite(out.tokens).all()


def test_pooled_is_normed_cls_token_or_token_mean():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    with_cls = fm3d.create_encoder("vit3d_tiny", depth=1).eval()
    assert with_cls.cls_token.shape == (1, 1, 192)
    no_cls = fm3d.create_encoder("vit3d_tiny", depth=1, cls_token=False).eval()
    assert not hasattr(no_cls, "cls_token") or no_cls.cls_token is None
    with torch.no_grad():
        out = no_cls(x)
        torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))
        out = with_cls(x)
        assert out.tokens.shape[1] == 8  # the cls token is not among the tokens
        assert not torch.allclose(out.pooled, out.tokens.mean(dim=1))


def test_hidden_layers_are_pre_norm_patch_tokens(tiny):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = tiny(x, hidden_layers=[0, -1])
        # Recompute block 0 by hand from the parts.
        t = tiny.patch_embed(x).flatten(2).transpose(1, 2)
        pos = tiny.pos_embed.reshape(1, 6, 6, 6, -1).permute(0, 4, 1, 2, 3)
        t = t + F.interpolate(pos, size=(2, 2, 2), mode="trilinear").flatten(2).transpose(1, 2)
        t = torch.cat([tiny.cls_token, t], dim=1)
        block0 = tiny.blocks[0](t)[:, 1:]
    assert len(out.hidden) == 2 and out.hidden_grids == [(2, 2, 2), (2, 2, 2)]
    torch.testing.assert_close(out.hidden[0], block0)
    torch.testing.assert_close(tiny.norm(out.hidden[1]), out.tokens)
    with pytest.raises(EncoderConfigError, match="out of range"):
        tiny(x, hidden_layers=[4])


def test_config_hidden_layers_are_the_default():
    enc = fm3d.create_encoder("vit3d_tiny", depth=2, hidden_layers=(1,)).eval()
    with torch.no_grad():
        assert len(enc(torch.randn(1, 1, 16, 16, 16)).hidden) == 1


def test_anisotropic_patch():
    enc = fm3d.create_encoder("vit3d_tiny", depth=1, patch_size=(4, 16, 16), image_size=(32, 256, 256)).eval()
    assert enc.patch_embed.proj.kernel_size == (4, 16, 16)
    assert enc.pos_embed.shape == (1, 8 * 16 * 16, 192)
    with torch.no_grad():
        out = enc(torch.randn(1, 1, 16, 64, 96))
    assert out.grid == (4, 4, 6) and out.tokens.shape == (1, 96, 192)


def test_input_not_divisible_by_patch_is_a_clear_error(tiny):
    with pytest.raises(EncoderInputError, match="not divisible"):
        tiny(torch.randn(1, 1, 40, 32, 32))


def test_resize_pos_embed_matches_hand_computed_trilinear():
    # Two positions along D, each channel value = position value; upsample 2 -> 4 (align_corners=False).
    pos = torch.tensor([[[1.0], [3.0]]])  # [1, N=2, C=1] on grid (2, 1, 1)
    out = resize_pos_embed(pos, (2, 1, 1), (4, 1, 1))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 1.5, 2.5, 3.0]))


def test_forward_uses_interpolated_pos_embed():
    torch.manual_seed(0)
    small = fm3d.create_encoder("vit3d_tiny", depth=1, image_size=(32, 32, 32)).eval()
    big = fm3d.create_encoder("vit3d_tiny", depth=1, image_size=(64, 64, 64)).eval()
    state = small.state_dict()
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], (2, 2, 2), (4, 4, 4))
    big.load_state_dict(state)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x).tokens, big(x).tokens)


def test_sincos_matches_monai_and_is_not_a_parameter():
    ours = sincos_pos_embed_3d((2, 3, 4), 48)
    theirs = build_sincos_position_embedding([2, 3, 4], 48, spatial_dims=3)
    torch.testing.assert_close(ours, theirs.data)
    enc = fm3d.create_encoder("vit3d_tiny", depth=1, pos_embed="sincos")
    assert "pos_embed" not in dict(enc.named_parameters()) and "pos_embed" not in enc.state_dict()
    # 1024 channels (vit3d_large) is not a multiple of 6: the spare channels stay zero.
    table = sincos_pos_embed_3d((2, 2, 2), 1024)
    assert table.shape == (1, 8, 1024) and table[..., 1020:].abs().sum() == 0


def test_grad_checkpointing_gives_equal_outputs_and_grads():
    torch.manual_seed(0)
    plain = fm3d.create_encoder("vit3d_tiny", depth=2)
    ckpt = fm3d.create_encoder("vit3d_tiny", depth=2, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    grads = []
    for enc in (plain, ckpt):
        out = enc(x)
        (out.tokens.square().mean() + out.pooled.sum()).backward()
        grads.append({n: p.grad for n, p in enc.named_parameters()})
    torch.testing.assert_close(plain(x).tokens, ckpt(x).tokens)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_eval_is_deterministic_with_all_dropouts_on():
    enc = fm3d.create_encoder(
        "vit3d_tiny",
        depth=2,
        drop_rate=0.5,
        attn_drop_rate=0.5,
        drop_path_rate=0.5,
        layer_scale_init=1e-5,
        qk_norm=True,
    ).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).tokens, enc(x).tokens, rtol=0, atol=0)
    names = dict(enc.named_parameters())
    assert {"blocks.0.ls1.gamma", "blocks.0.attn.q_norm.weight", "blocks.1.ls2.gamma"} <= set(names)


def test_parameter_names_and_layer_ids():
    enc = fm3d.create_encoder("vit3d_tiny", depth=2)
    names = set(dict(enc.named_parameters()))
    assert {
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
    } <= names
    assert enc.blocks[0].attn.qkv.weight.shape == (3 * 192, 192)
    family = encoder_family(enc)
    layer_id = functools.partial(family.layer_id, depth=family.depth(enc.config))
    assert family.depth(enc.config) == 2 and family.width(enc.config) == enc.embed_dim == 192
    assert layer_id("pos_embed") == 0 and layer_id("patch_embed.proj.weight") == 0
    assert layer_id("blocks.1.mlp.fc1.weight") == 2
    assert layer_id("norm.bias") == 3


def test_gelu_is_exact():
    enc = fm3d.create_encoder("vit3d_tiny", depth=1)
    x = torch.randn(10)
    torch.testing.assert_close(enc.blocks[0].mlp.act(x), F.gelu(x, approximate="none"))


def test_matches_monai_vit_with_mapped_weights():
    # MONAI's ViT is an independent implementation of the same architecture (no cls token,
    # LayerNorm eps 1e-5, fused qkv laid out (3, heads, head_dim)): renaming its weights
    # onto ours must give the same tokens and per-block hidden states.
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    theirs = ViT(
        1, (32, 32, 64), (16, 16, 16), hidden_size=48, mlp_dim=192, num_layers=2, num_heads=4, qkv_bias=True
    )
    ours = fm3d.create_encoder(
        "vit3d_tiny",
        embed_dim=48,
        num_heads=4,
        depth=2,
        image_size=(32, 32, 64),
        cls_token=False,
        norm_eps=1e-5,
    )
    renames = {
        "patch_embedding.position_embeddings": "pos_embed",
        "patch_embedding.patch_embeddings.": "patch_embed.proj.",
        "mlp.linear1.": "mlp.fc1.",
        "mlp.linear2.": "mlp.fc2.",
        "attn.out_proj.": "attn.proj.",
    }
    state = {}
    for key, value in theirs.state_dict().items():
        if "norm_cross_attn" in key:
            continue  # only used by MONAI's cross-attention variant
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 32, 32, 64)
    with torch.no_grad():
        expected, their_hidden = theirs.eval()(x)
        out = ours.eval()(x, hidden_layers=[0, 1])
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(out.hidden, their_hidden, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
