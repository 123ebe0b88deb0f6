"""ResNet3D-I3D: the I3D-inflated ResNet that Merlin uses as its image encoder, behind the encoder contract.

Merlin (Blankemeier et al., 2024, github.com/StanfordMIMI/Merlin, `merlin/models/i3res.py`)
inflates torchvision's ResNet-152 to 3D: the 7x7 stem becomes (3, 7, 7) with stride (1, 2, 2),
the max pool (3, 3, 3) with stride 2, every bottleneck's 3x3 becomes (3, 3, 3) with the
block's stride on all three axes, and the 1x1s and the downsample projection become
(1, 1, 1). Parameter names here equal Merlin's `i3_resnet.*` names (`conv1`, `bn1`,
`layer{1..4}.{i}.conv{1,2,3}`, `.bn{1,2,3}`, `.downsample.{0,1}`) so its weights map one to
one (see `fm3d.models.adapters.merlin`, which also folds Merlin's 3-channel stem and its
axis order into fm3d's).

Tokens are the last feature map flattened D-major ([B, d*h*w, 2048]); pooled is their mean,
which is exactly Merlin's 2048-d "image embedding" (its AdaptiveAvgPool3d). There is no final
norm: a CNN's last feature map is the representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fm3d.models.config import EncoderConfig, EncoderConfigError, EncoderInputError
from fm3d.models.config_checks import check_budget
from fm3d.models.encoder import EncoderFamily, EncoderOutput
from fm3d.models.registry import register_encoder, register_family

# Bottleneck output channels are 4x the block width, as in torchvision's ResNet-50/101/152.
EXPANSION = 4


@dataclass
class ResNet3DI3DConfig(EncoderConfig):
    """An I3D-inflated bottleneck ResNet; the defaults are Merlin's ResNet-152 and its preprocessing."""

    family: ClassVar[str] = "resnet3d_i3d"
    # Bottleneck blocks per stage: ResNet-152 is (3, 8, 36, 3), ResNet-50 (3, 4, 6, 3).
    layers: tuple[int, ...] = (3, 8, 36, 3)
    # Stem width; stage s has width base_width * 2**s and outputs 4x that (2048 for 64).
    base_width: int = 64
    # Merlin resamples to 1.5 x 1.5 x 3 mm (x, y, z), i.e. (3.0, 1.5, 1.5) in (D, H, W), and
    # maps HU [-1000, 1000] to [0, 1].
    target_spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.5)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    # Merlin's training size, 224 x 224 x 160 (x, y, z); any size divisible by 32 in H, W works,
    # so None (no crop) is allowed too.
    image_size: tuple[int, int, int] | None = (160, 224, 224)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise EncoderConfigError(
                f"{self.name or self.family}: layers needs four block counts >= 1, got {self.layers}."
            )
        if self.base_width < 1:
            raise EncoderConfigError(f"{self.name or self.family}: base_width must be >= 1.")
        check_budget(self, self.estimated_parameters(), f"layers {self.layers}, base_width {self.base_width}")

    def estimated_parameters(self) -> int:
        """Parameters + buffers of the network (BatchNorm: weight, bias, running mean and variance)."""
        width = self.base_width
        total = self.in_chans * width * 3 * 7 * 7 + 4 * width
        in_ch = width
        for index, blocks in enumerate(self.layers):
            w, out = width * 2**index, width * 2**index * EXPANSION
            block = w * w * 27 + w * out + 4 * (2 * w + out)  # conv2, conv3, bn1-3
            total += blocks * block + in_ch * w + (blocks - 1) * out * w  # conv1: in_ch, then 4w channels
            total += in_ch * out + 4 * out  # the first block's projected shortcut
            in_ch = out
        return int(total)

    @property
    def embed_dim(self) -> int:
        """Channels of the last stage (2048 for Merlin's ResNet-152)."""
        return self.base_width * 8 * EXPANSION


class Bottleneck3d(nn.Module):
    """1x1x1 reduce -> 3x3x3 (strided) -> 1x1x1 expand, with a projected shortcut when shapes change."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv3d(in_ch, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm3d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_ch, d, h, w] -> [B, 4*width, d/s, h/s, w/s]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _stage(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck3d(in_ch, width, stride)]
    layers += [Bottleneck3d(width * EXPANSION, width, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet3DI3D(nn.Module):
    """An I3D ResNet encoder: volume [B, C_in, D, H, W] -> `EncoderOutput` of last-stage tokens."""

    def __init__(self, config: ResNet3DI3DConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = RESNET3D_I3D.width(config)
        width = config.base_width
        self.conv1 = nn.Conv3d(
            config.in_chans, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
        )
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_ch = width
        for index, blocks in enumerate(config.layers):
            stage_width = width * 2**index
            stage = _stage(in_ch, stage_width, blocks, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
            in_ch = stage_width * EXPANSION
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's ResNet init: He-normal convs, unit BN; the last BN of each block at zero
        # so every residual branch starts as identity (its `zero_init_residual`), which trains
        # deep stacks from scratch more stably.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Bottleneck3d):
                nn.init.zeros_(module.bn3.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The four residual stages, layer1..layer4."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _hidden_indices(self, hidden_layers: Any) -> list[int]:
        requested = self.config.hidden_layers if hidden_layers is None else hidden_layers
        indices = []
        for index in requested:
            if not -4 <= index < 4:
                raise EncoderConfigError(
                    f"hidden layer {index} is out of range for {self.config.name}: a ResNet has stages 0..3."
                )
            indices.append(index % 4)
        return indices

    def forward(self, x: torch.Tensor, hidden_layers: Any = None) -> EncoderOutput:
        """Encode x [B, C_in, D, H, W]; `hidden_layers` picks stages 0..3 (layer1..layer4) to return."""
        if x.ndim != 5:
            raise EncoderInputError(f"expected a volume batch [B, C, D, H, W], got shape {tuple(x.shape)}.")
        wanted = self._hidden_indices(hidden_layers)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        use_checkpoint = self.config.grad_checkpointing and torch.is_grad_enabled()
        kept: dict[int, torch.Tensor] = {}
        for index, stage in enumerate(self.stages):
            x = checkpoint(stage, x, use_reentrant=False) if use_checkpoint else stage(x)
            if index in wanted:
                kept[index] = x
        grid = tuple(x.shape[2:])
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
        return EncoderOutput(
            tokens=tokens,
            pooled=tokens.mean(dim=1),
            grid=grid,
            hidden=[kept[i].flatten(2).transpose(1, 2) for i in wanted],
            hidden_grids=[tuple(kept[i].shape[2:]) for i in wanted],
        )


# No layer ids (its stages are not numbered for layer-wise decay), no Linear layers for LoRA and
# no segmentation decoder: the family is used as a frozen or fully fine-tuned feature extractor.
RESNET3D_I3D = register_family(
    EncoderFamily(
        config_class=ResNet3DI3DConfig,
        width=lambda config: config.embed_dim,
        depth=lambda config: len(config.layers),
    )
)


@register_encoder("resnet3d_i3d")
def resnet3d_i3d(**overrides: Any) -> ResNet3DI3D:
    """resnet3d_i3d: Merlin's I3D ResNet-152 (2048-d); `layers=`/`base_width=` give smaller variants."""
    base = ResNet3DI3DConfig(name="resnet3d_i3d")
    return ResNet3DI3D(ResNet3DI3DConfig.with_overrides(base, **overrides))
