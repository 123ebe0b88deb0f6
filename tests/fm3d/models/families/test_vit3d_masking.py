"""ViT3D's token dropping (`keep`, MAE) and mask-token replacement (`token_mask`, iBOT).

References are hand-assembled from the encoder's own parts (patch embedding, position table,
blocks, norm), so each test checks where the masking happens, not just that shapes fit.
"""

from __future__ import annotations

import pytest
import torch

import fm3d
from fm3d.models.config import EncoderInputError
from fm3d.models.pos_embed import resize_pos_embed

# 16 x 16 x 32 voxels with 8^3 patches: a (2, 2, 4) grid of 16 tokens.
SHAPE = (2, 1, 16, 16, 32)
GRID = (2, 2, 4)


def _encoder(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {"image_size": (16, 16, 16), "patch_size": (8, 8, 8), "depth": 2, **overrides}
    encoder = fm3d.create_encoder("vit3d_tiny", **settings)
    # Non-zero position table (learnable, trunc-normal) and cls token: both must land where expected.
    return encoder.eval()


def _reference(encoder, x: torch.Tensor, keep: torch.Tensor, hidden_layer: int | None = None):
    """Patch + position embed every token, gather `keep`, prepend cls, run the blocks, norm."""
    t = encoder.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, C]
    t = t + resize_pos_embed(encoder.pos_embed, encoder.config.grid, GRID)
    t = torch.stack([t[b, keep[b]] for b in range(t.shape[0])])  # [B, K, C]
    t = torch.cat([encoder.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
    hidden = None
    for index, block in enumerate(encoder.blocks):
        t = block(t)
        if index == hidden_layer:
            hidden = t[:, 1:]
    t = encoder.norm(t)
    return t[:, 1:], t[:, 0], hidden


def _random_keep(batch: int, n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])  # [B, K], any order


def test_keep_of_every_token_in_order_is_the_plain_forward():
    encoder = _encoder()
    x = torch.randn(SHAPE)
    keep = torch.arange(16).expand(2, -1).contiguous()
    with torch.no_grad():
        plain, kept = encoder(x, hidden_layers=[0]), encoder(x, hidden_layers=[0], keep=keep)
    torch.testing.assert_close(kept.tokens, plain.tokens, rtol=0, atol=0)
    torch.testing.assert_close(kept.pooled, plain.pooled, rtol=0, atol=0)
    torch.testing.assert_close(kept.hidden[0], plain.hidden[0], rtol=0, atol=0)
    assert kept.grid == plain.grid == GRID


def test_keep_of_a_subset_equals_gathering_after_the_position_embedding():
    encoder = _encoder()
    x = torch.randn(SHAPE)
    keep = _random_keep(2, 16, 5)
    with torch.no_grad():
        out = encoder(x, hidden_layers=[0], keep=keep)
        tokens, pooled, hidden = _reference(encoder, x, keep, hidden_layer=0)
    assert out.tokens.shape == (2, 5, 192) and out.grid == GRID and out.hidden_grids == [GRID]
    torch.testing.assert_close(out.tokens, tokens)
    torch.testing.assert_close(out.pooled, pooled)
    torch.testing.assert_close(out.hidden[0], hidden)


def test_without_cls_token_pooled_is_the_mean_of_the_kept_tokens():
    encoder = _encoder(cls_token=False, pos_embed="sincos")
    keep = _random_keep(2, 16, 4)
    with torch.no_grad():
        out = encoder(torch.randn(SHAPE), keep=keep)
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))


def test_kept_tokens_never_see_the_dropped_voxels():
    encoder = _encoder()
    keep = torch.tensor([[0, 5, 9, 14], [15, 2, 3, 8]])
    x = torch.randn(SHAPE)
    changed = x.clone()
    # Overwrite every voxel of every dropped patch (patch (i, j, k) covers 8^3 voxels).
    for b in range(2):
        for token in set(range(16)) - set(keep[b].tolist()):
            i, j, k = token // 8, token // 4 % 2, token % 4
            changed[b, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8, 8 * k : 8 * k + 8] = 100.0
    with torch.no_grad():
        before, after = encoder(x, keep=keep), encoder(changed, keep=keep)
        full_before, full_after = encoder(x), encoder(changed)
    torch.testing.assert_close(after.tokens, before.tokens, rtol=0, atol=0)
    torch.testing.assert_close(after.pooled, before.pooled, rtol=0, atol=0)
    assert not torch.allclose(full_after.tokens, full_before.tokens)  # the change is visible unmasked


def test_keep_gives_gradients_through_the_kept_path_with_checkpointing():
    x = torch.randn(SHAPE)
    keep = _random_keep(2, 16, 6)
    grads = []
    for ckpt in (False, True):
        encoder = _encoder(grad_checkpointing=ckpt).train()
        out = encoder(x, hidden_layers=[1], keep=keep)
        (out.tokens.square().mean() + out.pooled.sum() + out.hidden[0].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_token_mask_with_checkpointing_and_hidden_layers_gives_equal_outputs_and_grads():
    x = torch.randn(SHAPE)
    token_mask = torch.zeros(2, 16, dtype=torch.bool)
    token_mask[:, ::3] = True
    results = []
    for ckpt in (False, True):
        encoder = _encoder(grad_checkpointing=ckpt).train()
        torch.manual_seed(1)
        mask_token = torch.nn.Parameter(torch.randn(192))
        out = encoder(x, hidden_layers=[0], token_mask=token_mask, mask_token=mask_token)
        assert out.hidden[0].shape == (2, 16, 192)
        (out.tokens.square().mean() + out.hidden[0].mean()).backward()
        results.append((out.tokens.detach(), mask_token.grad, encoder.patch_embed.proj.weight.grad))
    for plain, ckpt in zip(*results, strict=True):
        torch.testing.assert_close(ckpt, plain)


def test_the_position_table_learns_only_in_the_kept_rows():
    encoder = _encoder().train()
    keep = torch.tensor([[1, 6], [6, 3]])
    # At the configured size (2, 2, 2) the table is used as is, one row per token.
    encoder(torch.randn(2, 1, 16, 16, 16), keep=keep).tokens.sum().backward()
    rows = encoder.pos_embed.grad[0].abs().sum(-1) > 0  # [8]
    assert rows.nonzero().flatten().tolist() == [1, 3, 6]


def test_all_false_token_mask_is_the_plain_forward_and_the_mask_token_gets_a_zero_gradient():
    encoder = _encoder()
    x = torch.randn(SHAPE)
    mask_token = torch.nn.Parameter(torch.randn(192))
    plain = encoder(x)
    masked = encoder(x, token_mask=torch.zeros(2, 16, dtype=torch.bool), mask_token=mask_token)
    torch.testing.assert_close(masked.tokens, plain.tokens, rtol=0, atol=0)
    masked.tokens.sum().backward()
    assert mask_token.grad is not None and torch.count_nonzero(mask_token.grad) == 0


def test_token_mask_replaces_patch_embeddings_before_the_position_embedding():
    encoder = _encoder()
    x = torch.randn(SHAPE)
    mask_token = torch.nn.Parameter(torch.randn(192))
    token_mask = torch.zeros(2, 16, dtype=torch.bool)
    token_mask[0, [1, 6, 7]] = True
    token_mask[1, [0, 15]] = True
    out = encoder(x, hidden_layers=[0], token_mask=token_mask, mask_token=mask_token)
    with torch.no_grad():
        t = encoder.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.where(token_mask[..., None], mask_token, t)
        t = t + resize_pos_embed(encoder.pos_embed, encoder.config.grid, GRID)
        t = torch.cat([encoder.cls_token.expand(2, -1, -1), t], dim=1)
        for block in encoder.blocks:
            t = block(t)
        t = encoder.norm(t)
    torch.testing.assert_close(out.tokens, t[:, 1:])
    out.tokens.sum().backward()
    assert torch.count_nonzero(mask_token.grad) > 0


def test_outputs_do_not_depend_on_the_masked_voxels():
    encoder = _encoder()
    mask_token = torch.randn(192)
    token_mask = torch.zeros(2, 16, dtype=torch.bool)
    token_mask[:, [2, 3, 12]] = True  # tokens (0,0,2), (0,0,3), (1,1,0)
    x = torch.randn(SHAPE)
    changed = x.clone()
    changed[:, :, 0:8, 0:8, 16:32] = -50.0  # tokens 2 and 3
    changed[:, :, 8:16, 8:16, 0:8] = 50.0  # token 12
    with torch.no_grad():
        before = encoder(x, token_mask=token_mask, mask_token=mask_token)
        after = encoder(changed, token_mask=token_mask, mask_token=mask_token)
    # Every token (masked or not) sees the same inputs: the masked patches' voxels never enter.
    torch.testing.assert_close(after.tokens, before.tokens, rtol=0, atol=0)
    torch.testing.assert_close(after.pooled, before.pooled, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": torch.zeros(2, 3, dtype=torch.int32)}, "keep= must be an int64"),
        ({"keep": torch.zeros(3, 4, dtype=torch.long)}, r"keep= must be .*\[B=2, K\]"),
        ({"keep": torch.zeros(2, dtype=torch.long)}, "keep= must be"),
        ({"keep": torch.full((2, 3), 16)}, r"keep= holds indices outside \[0, 16\)"),
        ({"keep": torch.full((2, 3), -1)}, "keep= holds indices outside"),
        ({"token_mask": torch.zeros(2, 16, dtype=torch.bool)}, "without mask_token="),
        (
            {"token_mask": torch.zeros(2, 16), "mask_token": torch.zeros(192)},
            r"token_mask= must be a bool tensor \[B=2, N=16\]",
        ),
        (
            {"token_mask": torch.zeros(2, 8, dtype=torch.bool), "mask_token": torch.zeros(192)},
            "token_mask= must be",
        ),
        (
            {"token_mask": torch.zeros(2, 16, dtype=torch.bool), "mask_token": torch.zeros(1, 192)},
            r"mask_token= must be a float tensor \[C=192\]",
        ),
        (
            {
                "keep": torch.zeros(2, 3, dtype=torch.long),
                "token_mask": torch.zeros(2, 16, dtype=torch.bool),
                "mask_token": torch.zeros(192),
            },
            "both keep= and token_mask=",
        ),
    ],
)
def test_wrong_masking_arguments_are_named(kwargs, match):
    encoder = _encoder(depth=1)
    with pytest.raises(EncoderInputError, match=match):
        encoder(torch.randn(SHAPE), **kwargs)


def test_mask_token_alone_is_ignored():
    encoder = _encoder(depth=1)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, mask_token=torch.randn(192)).tokens, encoder(x).tokens)
