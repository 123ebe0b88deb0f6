"""PatchEmbed3d: the patch-matmul forward equals the strided convolution its parameters describe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm3d.models.config import EncoderInputError
from fm3d.models.patch_embed import PatchEmbed3d


@pytest.mark.parametrize(
    ("in_chans", "patch", "size"),
    [(1, (16, 16, 16), (32, 48, 64)), (2, (4, 8, 6), (8, 16, 18)), (3, (2, 2, 2), (4, 6, 2))],
)
def test_equals_conv3d_in_values_and_gradients(in_chans, patch, size):
    torch.manual_seed(0)
    embed = PatchEmbed3d(in_chans, 24, patch).double()
    x = torch.randn(2, in_chans, *size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = embed(x)
    # The reference: torch's own strided convolution with the very same parameters.
    ref = F.conv3d(x_ref, embed.proj.weight, embed.proj.bias, stride=patch)
    assert out.shape == ref.shape == (2, 24, *(s // p for s, p in zip(size, patch, strict=True)))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, embed.proj.weight, embed.proj.bias), upstream)
    weight_ref = embed.proj.weight.detach().clone().requires_grad_(True)
    bias_ref = embed.proj.bias.detach().clone().requires_grad_(True)
    ref = F.conv3d(x_ref, weight_ref, bias_ref, stride=patch)
    grads_ref = torch.autograd.grad(ref, (x_ref, weight_ref, bias_ref), upstream)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fp32_matches_the_module_convolution():
    torch.manual_seed(0)
    embed = PatchEmbed3d(1, 96, (16, 16, 16))
    x = torch.randn(1, 1, 32, 64, 48)
    torch.testing.assert_close(embed(x), embed.proj(x), rtol=1e-5, atol=1e-5)


def test_token_view_needs_no_copy():
    embed = PatchEmbed3d(1, 8, (2, 2, 2))
    tokens = embed(torch.randn(1, 1, 4, 4, 6)).flatten(2).transpose(1, 2)  # what ViT3D does
    assert tokens.shape == (1, 2 * 2 * 3, 8) and tokens.is_contiguous()


def test_state_dict_keys_are_the_convolution_ones():
    embed = PatchEmbed3d(1, 8, (2, 4, 4))
    assert {k: tuple(v.shape) for k, v in embed.state_dict().items()} == {
        "proj.weight": (8, 1, 2, 4, 4),
        "proj.bias": (8,),
    }


def test_wrong_rank_or_size_is_a_clear_error():
    embed = PatchEmbed3d(1, 8, (2, 2, 2))
    with pytest.raises(EncoderInputError, match="expected a volume batch"):
        embed(torch.randn(1, 4, 4, 4))
    with pytest.raises(EncoderInputError, match="not divisible by the patch size"):
        embed(torch.randn(1, 1, 4, 4, 5))
