"""Multi-head attention with a per-call choice of kernel: xformers, torch SDPA or plain math.

Every backend takes and returns the token-major layout [B, N, H, Dh] that a fused qkv
projection produces for free (`qkv(x).unflatten(-1, (3, H, Dh)).unbind(2)` gives views), so
the hot path makes no copies: xformers consumes that layout directly and SDPA gets a
transposed *view* ([B, H, N, Dh]). The backend is decided on every call from the tensors at
hand (device, dtype), never once at import: DINOv2's import-time switch picks xformers on a
CUDA machine and then fails for a CPU tensor.

Choosing a backend, highest precedence first:
1. an explicit `backend=` argument other than "auto" (the encoder config's `attention_backend`);
2. the environment variable `FM3D_ATTENTION_BACKEND` (xformers | sdpa | math), which only
   replaces "auto";
3. "auto": xformers when importable, the tensors are on CUDA and their dtype is fp16, bf16 or
   fp32; otherwise SDPA.

Masks: `bias` is additive, broadcastable to [B, H, Nq, Nk]; `key_padding_mask` is bool
[B, Nk] with True = padding (that key is ignored), as in `torch.nn.MultiheadAttention`.
Each query must keep at least one key, otherwise its row is undefined (NaN).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from fm3d.errors import Fm3dError

BACKENDS = ("xformers", "sdpa", "math")
ENV_VAR = "FM3D_ATTENTION_BACKEND"
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class AttentionBackendError(Fm3dError, RuntimeError):
    """A requested attention backend that is unknown or cannot run on the given tensors."""


def xformers_available() -> bool:
    """Whether the optional `xformers` package is installed (checked without importing it)."""
    return importlib.util.find_spec("xformers") is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device`."""
    device = torch.device(device)
    usable = ["sdpa", "math"]
    if device.type == "cuda" and xformers_available():
        usable.insert(0, "xformers")
    return usable


def resolve_backend(requested: str, q: torch.Tensor) -> str:
    """The concrete backend for tensors like `q`, following the precedence in the module docstring."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if requested != "auto" and requested not in BACKENDS:
            raise AttentionBackendError(
                f"{ENV_VAR}={requested!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it."
            )
    if requested == "auto":
        if q.is_cuda and q.dtype in _XFORMERS_DTYPES and xformers_available():
            return "xformers"
        return "sdpa"
    if requested not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {requested!r}; use auto or {BACKENDS}.")
    if requested == "xformers":
        if not xformers_available():
            raise AttentionBackendError(
                "attention backend 'xformers' was requested but xformers is not installed; "
                "install the extra (`pip install fm3d[xformers]`) or choose 'auto'."
            )
        if not q.is_cuda:
            raise AttentionBackendError(
                f"attention backend 'xformers' has no kernels for {q.device.type} tensors; "
                "use 'auto' or 'sdpa'."
            )
    return requested


def _merged_bias(
    bias: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor
) -> torch.Tensor | None:
    """One additive float bias broadcastable to [B, H, Nq, Nk], or None when there is nothing to add."""
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, Nk]
        bias = pad if bias is None else bias.to(q.dtype) + pad
    return None if bias is None else bias.to(q.dtype)


def _math(q, k, v, bias, dropout_p, scale):
    # The reference: scores in fp32 whatever the input dtype, so it can judge low-precision kernels.
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, N, Dh]
    scores = (qh * scale) @ kh.transpose(-2, -1)  # [B, H, Nq, Nk]
    if bias is not None:
        scores = scores + bias.float()
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p) if dropout_p else scores.softmax(dim=-1)
    return (weights @ vh).to(q.dtype).transpose(1, 2)  # [B, Nq, H, Dh]


def _sdpa(q, k, v, bias, dropout_p, scale):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=bias,
        dropout_p=dropout_p,
        scale=scale,
    )  # [B, H, Nq, Dh]
    return out.transpose(1, 2)


def _xformers(q, k, v, bias, dropout_p, scale):
    import xformers.ops as xops

    if bias is not None:
        batch, nq, heads, _ = q.shape
        nk = k.shape[1]
        # xformers wants a full [B, H, Nq, Nk] bias whose rows start 8-element aligned.
        padded = torch.empty(batch, heads, nq, -(-nk // 8) * 8, dtype=q.dtype, device=q.device)
        padded = padded[..., :nk]
        padded.copy_(bias.expand(batch, heads, nq, nk))
        bias = padded
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)


_KERNELS = {"math": _math, "sdpa": _sdpa, "xformers": _xformers}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v of shape [B, N, H, Dh]; returns [B, Nq, H, Dh].

    `dropout_p` is applied as given: callers pass 0 outside training (the `Attention` module
    does). `scale` defaults to 1/sqrt(Dh).
    """
    chosen = resolve_backend(backend, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _KERNELS[chosen](q, k, v, _merged_bias(bias, key_padding_mask, q), dropout_p, scale)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm/MONAI layout: (3, heads, head_dim))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over the tokens of x [B, N, C]; returns [B, N, C]."""
        batch, n, dim = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # [B, N, 3, H, Dh]
        q, k, v = qkv.unbind(2)  # views, [B, N, H, Dh] each
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(
            q,
            k,
            v,
            bias=bias,
            key_padding_mask=key_padding_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )  # [B, N, H, Dh]
        return self.proj_drop(self.proj(out.reshape(batch, n, dim)))
