"""Segmentation decoders over an fm3d encoder's hidden states, and the registry that picks one.

- `UNETRDecoder` (ViT encoders): MONAI UNETR's decoder generalised to any depth and patch size.
  A patch of 2^L voxels needs L upsampling levels; the skips are the input itself
  (`UnetrBasicBlock`), L - 1 hidden states taken at depth/L multiples (layers
  `i * depth // L`, i = 1..L-1 — MONAI's 3, 6, 9 for depth 12 and patch 16) brought to their
  resolution by `UnetrPrUpBlock`, and the final tokens at the bottom; `UnetrUpBlock` joins them
  coarse to fine and `UnetOutBlock` gives the class logits.
- `SwinUNETRDecoder` (swin encoders): MONAI SwinUNETR's decoder (decoder5..1 + out) over the
  skip maps the swin encoder returns as `hidden` (finest first) and its final tokens.

Both are registered by name (`register_decoder("unetr")`, `"swin_unetr"`); `build_decoder`
takes the one the encoder's family declares (`EncoderFamily.decoder`) unless the task names
another, so a new decoder is a builder function here or in any imported module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from fm3d.errors import Fm3dError
from fm3d.models.encoder import EncoderOutput
from fm3d.models.registry import encoder_family, get_family, list_families

DecoderBuilder = Callable[[nn.Module, int, int], nn.Module]
_DECODERS: dict[str, DecoderBuilder] = {}


class DecoderConfigError(Fm3dError, ValueError):
    """A decoder that cannot be chosen or built: unknown name, no default for the encoder's family,
    or an encoder whose geometry it cannot follow (e.g. a patch size that is not 2^k)."""


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, N, C] tokens on a (d, h, w) grid -> [B, C, d, h, w] feature map."""
    b, n, c = tokens.shape
    if n != math.prod(grid):
        raise DecoderConfigError(f"{n} tokens do not fill the grid {grid}")
    return tokens.transpose(1, 2).reshape(b, c, *grid)


def upsampling_strides(patch_size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Per-level (coarse to fine) upsampling strides that undo a 2^k patch in every dimension.

    A dimension with a smaller patch stops upsampling at the coarse levels, e.g. (4, 16, 16)
    gives [(1,2,2), (1,2,2), (2,2,2), (2,2,2)].
    """
    exponents = []
    for p in patch_size:
        k = round(math.log2(p))
        if p < 1 or 2**k != p:
            raise DecoderConfigError(f"the UNETR decoder needs power-of-two patch sizes, got {patch_size}")
        exponents.append(k)
    levels = max(exponents)
    if levels < 1:
        raise DecoderConfigError(f"patch size {patch_size} has nothing to upsample")
    return [tuple(2 if j >= levels - k else 1 for k in exponents) for j in range(levels)]


def unetr_hidden_layers(depth: int, levels: int) -> list[int]:
    """0-based block indices whose outputs feed the skips: depth/levels multiples, shallow first."""
    if depth < levels - 1:
        raise DecoderConfigError(f"a depth-{depth} ViT has too few blocks for {levels - 1} UNETR skips")
    return [i * depth // levels for i in range(1, levels)]


def _pr_up(in_ch: int, out_ch: int, strides: list[tuple[int, int, int]]) -> nn.Module:
    """Upsample a hidden state through `strides` (MONAI's UnetrPrUpBlock when they are all equal)."""
    if all(s == strides[0] for s in strides):
        return UnetrPrUpBlock(
            3,
            in_ch,
            out_ch,
            num_layer=len(strides) - 1,
            kernel_size=3,
            stride=1,
            upsample_kernel_size=strides[0],
            norm_name="instance",
            conv_block=True,
            res_block=True,
        )
    # Anisotropic patches: one single-step block per level, each with its own stride.
    return nn.Sequential(
        *[
            UnetrPrUpBlock(
                3,
                in_ch if i == 0 else out_ch,
                out_ch,
                num_layer=0,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=s,
                norm_name="instance",
                conv_block=True,
                res_block=True,
            )
            for i, s in enumerate(strides)
        ]
    )


class UNETRDecoder(nn.Module):
    """MONAI UNETR's decoder over a ViT's hidden states, for any depth and power-of-two patch."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        patch_size: tuple[int, int, int],
        num_classes: int,
        feature_size: int = 16,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.strides = upsampling_strides(patch_size)
        levels = len(self.strides)
        self.hidden_layers = unetr_hidden_layers(depth, levels)
        # Channels at decoder level j (coarse -> fine): feature_size * 2^(L-1-j), as UNETR's 8f, 4f, 2f, f.
        channels = [feature_size * 2 ** (levels - 1 - j) for j in range(levels)]
        self.input_skip = UnetrBasicBlock(3, in_channels, feature_size, 3, 1, "instance", res_block=True)
        # Hidden state i (shallow first) joins at level L-1-i: it climbs the L-i coarsest strides.
        self.hidden_skips = nn.ModuleList(
            _pr_up(embed_dim, channels[levels - 1 - i], self.strides[: levels - i]) for i in range(1, levels)
        )
        self.up = nn.ModuleList(
            UnetrUpBlock(
                3,
                embed_dim if j == 0 else channels[j - 1],
                channels[j],
                3,
                self.strides[j],
                "instance",
                res_block=True,
            )
            for j in range(levels)
        )
        self.out = UnetOutBlock(3, feature_size, num_classes)

    def forward(self, image: torch.Tensor, features: EncoderOutput) -> torch.Tensor:
        """Class logits [B, K, D, H, W] from the model input and the encoder's output."""
        if len(features.hidden) != len(self.hidden_layers):
            raise DecoderConfigError(
                f"expected {len(self.hidden_layers)} hidden states (layers {self.hidden_layers}), "
                f"got {len(features.hidden)}"
            )
        levels = len(self.strides)
        skips = [self.input_skip(image)]  # fine -> coarse
        for i, (hidden, grid) in enumerate(zip(features.hidden, features.hidden_grids, strict=True), start=1):
            skips.append(self.hidden_skips[i - 1](tokens_to_map(hidden, grid)))
        x = tokens_to_map(features.tokens, features.grid)
        for j in range(levels):
            x = self.up[j](x, skips[levels - 1 - j])
        return self.out(x)


class SwinUNETRDecoder(nn.Module):
    """MONAI SwinUNETR's decoder (decoder5..decoder1 + out) over a swin encoder's skip maps.

    Uses the five skip maps fm3d's swin3d returns as `hidden` (finest first: encoder1..4 and the
    raw last-but-one stage) and its tokens (encoder10 of the last stage), exactly as
    SwinUNETR.forward wires them.
    """

    hidden_layers = (0, 1, 2, 3, 4)

    def __init__(self, feature_size: int, num_classes: int) -> None:
        super().__init__()
        f = feature_size

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(3, cin, cout, 3, 2, "instance", res_block=True)

        self.decoder5, self.decoder4, self.decoder3 = up(16 * f, 8 * f), up(8 * f, 4 * f), up(4 * f, 2 * f)
        self.decoder2, self.decoder1 = up(2 * f, f), up(f, f)
        self.out = UnetOutBlock(3, f, num_classes)

    def forward(self, image: torch.Tensor, features: EncoderOutput) -> torch.Tensor:
        """Class logits [B, K, D, H, W] from the encoder's skip maps and tokens."""
        if len(features.hidden) != len(self.hidden_layers):
            raise DecoderConfigError(
                f"expected the {len(self.hidden_layers)} swin skip maps, got {len(features.hidden)}"
            )
        enc0, enc1, enc2, enc3, stage3 = (
            tokens_to_map(h, g) for h, g in zip(features.hidden, features.hidden_grids, strict=True)
        )
        x = self.decoder5(tokens_to_map(features.tokens, features.grid), stage3)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        x = self.decoder2(x, enc1)
        return self.out(self.decoder1(x, enc0))


def register_decoder(name: str) -> Callable[[DecoderBuilder], DecoderBuilder]:
    """Register `builder(encoder, num_classes, feature_size) -> decoder` under `name` (a decorator).

    The decoder is an `nn.Module` with `forward(image, features) -> logits [B, K, D, H, W]` and a
    `hidden_layers` attribute: the encoder layers it needs in `features.hidden`. An encoder
    family names its default decoder in its declaration (`EncoderFamily.decoder`).
    """

    def decorator(builder: DecoderBuilder) -> DecoderBuilder:
        existing = _DECODERS.get(name)
        if existing is not None and existing is not builder:
            owner = f"{existing.__module__}.{existing.__qualname__}"
            raise DecoderConfigError(f"decoder name {name!r} is already registered by {owner}")
        _DECODERS[name] = builder
        return builder

    return decorator


def list_decoders() -> list[str]:
    """The registered decoder names, sorted."""
    return sorted(_DECODERS)


def _family_defaults() -> str:
    """ "family (decoder)" for every encoder family that declares a default decoder."""
    declared = [get_family(name) for name in list_families()]
    return ", ".join(f"{f.name} ({f.decoder})" for f in declared if f.decoder) or "none"


def build_decoder(
    encoder: nn.Module, num_classes: int, feature_size: int = 16, name: str | None = None
) -> tuple[nn.Module, list[int]]:
    """The decoder `name` (default: the one `encoder`'s family declares) and the hidden layers it needs."""
    family = encoder_family(encoder)
    if name is None:
        if family is None or family.decoder is None:
            described = f"encoder family {family.name!r}" if family else type(encoder).__name__
            raise DecoderConfigError(
                f"{described} declares no segmentation decoder; families with one: {_family_defaults()}. "
                f"Use one of those encoders, or set model.decoder to one of {list_decoders()}"
            )
        name = family.decoder
    if name not in _DECODERS:
        raise DecoderConfigError(f"unknown segmentation decoder {name!r}; registered: {list_decoders()}")
    decoder = _DECODERS[name](encoder, num_classes, feature_size)
    return decoder, list(decoder.hidden_layers)


def _refuse(decoder: str, encoder: nn.Module, needs: str) -> DecoderConfigError:
    return DecoderConfigError(
        f"the {decoder} decoder needs {needs}, which {type(encoder).__name__} has not; families that "
        f"default to a decoder: {_family_defaults()}"
    )


@register_decoder("unetr")
def unetr(encoder: nn.Module, num_classes: int, feature_size: int) -> UNETRDecoder:
    """UNETR over a plain ViT: hidden states at depth/levels multiples and the final tokens."""
    family, config = encoder_family(encoder), encoder.config
    patch = getattr(config, "patch_size", None)
    if family is None or not isinstance(patch, tuple) or len(patch) != 3:
        raise _refuse("unetr", encoder, "an encoder family's depth and a (D, H, W) patch_size")
    return UNETRDecoder(
        encoder.embed_dim, family.depth(config), patch, num_classes, feature_size, config.in_chans
    )


@register_decoder("swin_unetr")
def swin_unetr(encoder: nn.Module, num_classes: int, feature_size: int) -> SwinUNETRDecoder:
    """SwinUNETR's decoder at the encoder's own `feature_size` (the task's is not used)."""
    if not isinstance(getattr(encoder.config, "feature_size", None), int):
        raise _refuse("swin_unetr", encoder, "a Swin feature_size in its config")
    return SwinUNETRDecoder(encoder.config.feature_size, num_classes)
