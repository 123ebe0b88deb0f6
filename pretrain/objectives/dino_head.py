"""DINOv2's projection head: the MLP that maps an encoder token to logits over prototypes.

Reproduces `dinov2/layers/dino_head.py` (`DINOHead`, `_build_mlp`, without the optional
BatchNorm that DINOv2 never enables): an MLP with GELU between its layers down to a bottleneck,
L2 normalisation of the bottleneck, and a weight-normalised linear layer without bias whose
rows are the prototypes. The same seed gives the same weights as DINOv2's head (same layers
created and initialised in the same order), so the parity test compares both directly.

Where fm3d differs, and why:
- Weight normalisation uses `torch.nn.utils.parametrizations.weight_norm` (DINOv2 uses the
  deprecated `torch.nn.utils.weight_norm`). The state-dict keys become
  `last_layer.parametrizations.weight.original0` (the norm g, DINOv2's `weight_g`) and
  `...original1` (the direction v, `weight_v`); torch converts a state dict with DINOv2's
  `weight_g`/`weight_v` keys on load. A parametrised module is copied with `copy.deepcopy`
  (the EMA teacher) and saved through its state dict (`torch.save(module)` refuses it).
- `norm_last_layer=True` (the default) freezes g at 1, so every prototype keeps unit norm and
  the logits are cosine similarities in [-1, 1]. DINOv2 sets g to 1 at construction but
  leaves it trainable (its optimizer decays it like any weight); `norm_last_layer=False`
  reproduces that exactly. The name and the frozen default come from DINO (v1)'s
  `--norm_last_layer`, whose help says a free norm performs better but can make training
  unstable (DINO used the free norm for ViT-S and the fixed one for ViT-B).

Its parameters live under `last_layer`, the name DINOv2's optimizer matches to hold the
prototypes still during the first epoch (`freeze_last_layer_epochs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """Token features [N, in_dim] -> prototype logits [N, out_dim], as DINOv2's `DINOHead`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, hidden_dim, bottleneck_dim)
        # Initialise the MLP before the last layer exists, as DINOv2 does: the last layer keeps
        # nn.Linear's default initialisation for its direction v.
        self.apply(_init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0  # g, [out_dim, 1]
        with torch.no_grad():
            norm.fill_(1.0)
        norm.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # [N, bottleneck_dim]
        # 1e-12 underflows to 0 in float16 (not in bfloat16, which has float32's range).
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # [N, out_dim]


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    """DINOv2's `_build_mlp` without BatchNorm: one Linear, or Linear-GELU blocks then a Linear."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02, cut at +-2, DINOv2's `trunc_normal_` defaults) and zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
