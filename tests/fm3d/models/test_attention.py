"""Attention backends against the math reference and against torch.nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fm3d.models import attention as attn_mod
from fm3d.models.attention import (
    ENV_VAR,
    Attention,
    AttentionBackendError,
    attention,
    available_backends,
    resolve_backend,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _qkv(device, dtype, b=2, n=37, h=3, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=gen).to(device, dtype) for _ in range(3)]


def _masks(device, b=2, n=37, h=3):
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(b, h, n, n, generator=gen).to(device)
    pad = torch.zeros(b, n, dtype=torch.bool, device=device)
    pad[0, -5:] = True  # the first sample's last five keys are padding
    return bias, pad


def test_math_matches_hand_computed_softmax():
    q = torch.tensor([[[[1.0, 0.0]]]])  # [B=1, N=1, H=1, D=2]
    k = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # N=2
    v = torch.tensor([[[[10.0, 0.0]], [[0.0, 20.0]]]])
    out = attention(q, k, v, backend="math")
    # scores = [1, 0] / sqrt(2); weights = softmax of that
    w0 = torch.tensor(1 / 2**0.5).exp() / (torch.tensor(1 / 2**0.5).exp() + 1)
    expected = torch.stack([10 * w0, 20 * (1 - w0)])
    torch.testing.assert_close(out[0, 0, 0], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_matches_math_with_bias_and_mask(device, dtype):
    q, k, v = _qkv(device, dtype)
    bias, pad = _masks(device)
    reference = attention(q, k, v, bias=bias, key_padding_mask=pad, backend="math").float()
    for backend in available_backends(device):
        out = attention(q, k, v, bias=bias, key_padding_mask=pad, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out.float(), reference, atol=tol, rtol=tol, msg=f"backend {backend}")


def test_padding_mask_ignores_padded_keys():
    q, k, v = _qkv("cpu", torch.float32, b=1, n=8)
    pad = torch.zeros(1, 8, dtype=torch.bool)
    pad[0, 5:] = True
    masked = attention(q, k, v, key_padding_mask=pad, backend="sdpa")
    truncated = attention(q, k[:, :5], v[:, :5], backend="sdpa")
    torch.testing.assert_close(masked, truncated)


def test_module_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads, n = 48, 4, 11
    ours = Attention(dim, heads, backend="math").eval()
    ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, n, dim)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, -3:] = True
    expected, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
    for backend in ("math", "sdpa"):
        ours.backend = backend
        torch.testing.assert_close(ours(x, key_padding_mask=pad), expected, atol=1e-5, rtol=1e-5)


def test_auto_never_picks_xformers_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    # Even where xformers is installed, CPU tensors must go to SDPA.
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.zeros(1, 1, 1, 8, dtype=dtype)) == "sdpa"
    assert "xformers" not in available_backends("cpu")


def test_forced_xformers_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: True)
    with pytest.raises(AttentionBackendError, match="cpu"):
        resolve_backend("xformers", torch.zeros(1, 1, 1, 8))


def test_env_var_replaces_auto_only(monkeypatch):
    q = torch.zeros(1, 1, 1, 8)
    monkeypatch.setenv(ENV_VAR, "math")
    assert resolve_backend("auto", q) == "math"
    assert resolve_backend("sdpa", q) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(AttentionBackendError, match=ENV_VAR):
        resolve_backend("auto", q)


def test_unknown_backend_is_refused():
    with pytest.raises(AttentionBackendError, match="unknown"):
        resolve_backend("cudnn", torch.zeros(1, 1, 1, 8))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_dropout_only_in_training(backend):
    torch.manual_seed(0)
    module = Attention(32, 2, attn_drop=0.5, backend=backend)
    x = torch.randn(1, 16, 32)
    module.eval()
    first, second = module(x), module(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    module.attn_drop = 0.0
    torch.testing.assert_close(first, module(x), rtol=0, atol=0)
    module.attn_drop = 0.5
    module.train()
    assert not torch.allclose(module(x), first)
