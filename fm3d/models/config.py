"""Encoder configurations: one JSON-serialisable dataclass per encoder family.

A config travels with the weights (`config.json` beside `model.safetensors`, or
`"fm3d_encoder_config"` inside a Lightning checkpoint), so it also carries the input spec the
weights expect (`target_spacing_mm`, `hu_window`, `intensity_range`, `axis_order`,
`image_size`: the fields of `fm3d.spec.InputSpec`, under the same names), as timm's
`pretrained_cfg` does. Sizes are in (D, H, W) order, like every array in fm3d.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fm3d.errors import Fm3dError
from fm3d.models.config_checks import (
    EncoderConfigError,
    check_budget,
    check_field_types,
    check_positive,
)
from fm3d.spec import AxisOrder, InputSpec, InputSpecError

__all__ = ["EncoderConfig", "EncoderConfigError", "EncoderInputError", "Swin3DConfig", "ViT3DConfig"]


class EncoderInputError(Fm3dError, ValueError):
    """An input volume whose shape the encoder cannot take (wrong rank or not divisible)."""


AttentionBackendName = Literal["auto", "xformers", "sdpa", "math"]
# Config keys renamed since configs were first written (old name -> field): stored configs
# (config.json, a checkpoint's "fm3d_encoder_config") written before the rename still load.
RENAMED_FIELDS = {"img_size": "image_size"}


def upgrade_stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config dict with renamed keys under their current names (a copy; both names is an error)."""
    data = dict(data)
    for old, new in RENAMED_FIELDS.items():
        if old in data:
            if new in data:
                raise EncoderConfigError(
                    f"config holds both {old!r} (the old name) and {new!r}; keep only {new!r}."
                )
            data[new] = data.pop(old)
    return data


@dataclass
class EncoderConfig:
    """Fields every encoder family shares: identity, input channels and the input spec."""

    family: ClassVar[str] = ""
    # True where the family cannot do without a configured size (ViT3D: it sizes the position
    # embedding table); an `image_size=None` override then keeps the configured size.
    image_size_required: ClassVar[bool] = False
    name: str = ""
    in_chans: int = 1
    # The input spec the weights were trained with (see fm3d.spec.InputSpec, which checks it).
    target_spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.5)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    intensity_range: tuple[float, float] = (0.0, 1.0)
    axis_order: AxisOrder = "zyx"
    # The crop in voxels the weights were trained on, in the encoder's input axes (axis_order:
    # (D, H, W) for "zyx"); None: any size the encoder's patching divides.
    image_size: tuple[int, int, int] | None = None
    # Indices of the hidden states `forward` returns when called without `hidden_layers`.
    hidden_layers: tuple[int, ...] = ()
    grad_checkpointing: bool = False
    # Where the weights came from (peer format, file, key mapping); filled by fm3d.models.adapters.
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Configs come from files: a wrong type is named here, not met as a torch error later.
        check_field_types(self)
        # JSON turns tuples into lists; normalise so configs compare equal after a round trip.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        # A copy, so configs made from one registered base never share (and mutate) one dict.
        self.source = dict(self.source)
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size,) * 3
        check_positive(self, ("in_chans",))
        # InputSpec checks and normalises the spec fields; the config keeps its normalised values.
        try:
            spec = InputSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(InputSpec)})
        except InputSpecError as error:
            raise EncoderConfigError(f"{self.name or self.family} config: {error}.") from error
        for f in dataclasses.fields(InputSpec):
            setattr(self, f.name, getattr(spec, f.name))

    @property
    def input_spec(self) -> InputSpec:
        """The input spec the weights expect, as the one object preparation and sampling share."""
        return InputSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(InputSpec)})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, `family` included."""
        out: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """Rebuild a config from `to_dict()` output (renamed keys mapped); unknown keys are an error."""
        data = upgrade_stored_config(data)
        family = data.pop("family", cls.family)
        if family != cls.family:
            raise EncoderConfigError(f"config is for family {family!r}, not {cls.family!r}.")
        return cls.with_overrides(cls(), **data)

    @classmethod
    def with_overrides(cls, base: EncoderConfig, **overrides: Any) -> EncoderConfig:
        """A copy of `base` with `overrides` applied; names the unknown fields when there are any.

        `image_size=None` ("any size", as an input spec may say) keeps the configured size of a
        family that needs one (`image_size_required`).
        """
        if cls.image_size_required and "image_size" in overrides and overrides["image_size"] is None:
            overrides = {key: value for key, value in overrides.items() if key != "image_size"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise EncoderConfigError(
                f"unknown {cls.family} config field(s) {unknown}; valid fields: {sorted(known)}."
            )
        return dataclasses.replace(base, **overrides)


def _triple(value: int | tuple[int, ...], what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise EncoderConfigError(f"{what} needs one int or three (D, H, W); got {value!r}.")
    return tuple(int(v) for v in value)


@dataclass
class ViT3DConfig(EncoderConfig):
    """A plain 3D ViT: sizes, patching, position embedding and regularisation."""

    family: ClassVar[str] = "vit3d"
    image_size_required: ClassVar[bool] = True
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (16, 16, 16)
    # The configured input size in voxels: it sizes the position embedding table, which other
    # sizes interpolate, so a ViT always has one.
    image_size: tuple[int, int, int] = (96, 96, 96)
    qkv_bias: bool = True
    qk_norm: bool = False
    # None disables layer scale (no ls1/ls2 parameters); DINOv2 uses 1e-5.
    layer_scale_init: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pos_embed: Literal["sincos", "learnable"] = "learnable"
    cls_token: bool = True
    norm_eps: float = 1e-6
    attention_backend: AttentionBackendName = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.patch_size = _triple(self.patch_size, "patch_size")
        check_positive(
            self, ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "image_size", "norm_eps")
        )
        if self.embed_dim % self.num_heads:
            raise EncoderConfigError(
                f"{self.name}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}."
            )
        if any(s % p for s, p in zip(self.image_size, self.patch_size, strict=True)):
            raise EncoderConfigError(
                f"{self.name}: image_size {self.image_size} is not divisible by patch_size {self.patch_size}."
            )
        if self.pos_embed not in ("sincos", "learnable"):
            raise EncoderConfigError(f"pos_embed must be 'sincos' or 'learnable', not {self.pos_embed!r}.")
        if self.attention_backend not in ("auto", "xformers", "sdpa", "math"):
            raise EncoderConfigError(
                f"attention_backend must be auto, xformers, sdpa or math, not {self.attention_backend!r}."
            )
        check_budget(
            self,
            self.estimated_parameters(),
            f"embed_dim {self.embed_dim}, depth {self.depth}, "
            f"{math.prod(self.grid)} tokens from image_size {self.image_size} / patch_size {self.patch_size}",
        )

    def estimated_parameters(self) -> int:
        """Parameters + buffers the encoder allocates, from the config alone (before building it)."""
        dim, hidden = self.embed_dim, int(self.embed_dim * self.mlp_ratio)
        norms = 4 * dim + (2 * dim if self.layer_scale_init is not None else 0)
        attention = 4 * dim * dim + dim + (3 * dim if self.qkv_bias else 0)
        attention += 4 * dim // self.num_heads if self.qk_norm else 0
        mlp = 2 * dim * hidden + hidden + dim
        block = norms + attention + mlp
        stem = self.in_chans * math.prod(self.patch_size) * dim + dim + (dim if self.cls_token else 0)
        return stem + math.prod(self.grid) * dim + self.depth * block + 2 * dim

    @property
    def grid(self) -> tuple[int, int, int]:
        """The configured token grid (d, h, w)."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size, strict=True))


@dataclass
class Swin3DConfig(EncoderConfig):
    """MONAI's SwinUNETR(-v2) encoder: the settings VoCo's published weights were trained with."""

    family: ClassVar[str] = "swin3d"
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_name: str = "instance"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    normalize: bool = True
    use_v2: bool = True
    # VoCo crops (64, 192, 192) voxels in (D, H, W); the windowed stages take any multiple of
    # patch_size * 16 (32) per axis, so None (no crop) is allowed too.
    image_size: tuple[int, int, int] | None = (64, 192, 192)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(
            self, ("feature_size", "depths", "num_heads", "window_size", "patch_size", "mlp_ratio")
        )
        if self.feature_size % 12:
            raise EncoderConfigError(
                f"{self.name}: feature_size {self.feature_size} must be divisible by 12 (MONAI SwinUNETR)."
            )
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise EncoderConfigError(
                f"{self.name}: depths {self.depths} and num_heads {self.num_heads} need one entry per "
                "stage (4, as MONAI SwinUNETR)."
            )
        divisor = self.patch_size * 2 ** len(self.depths)
        if self.image_size is not None and any(n % divisor for n in self.image_size):
            raise EncoderConfigError(
                f"{self.name}: image_size {self.image_size} is not divisible by {divisor} "
                "(patch_size * 2^stages), which the Swin stages need."
            )
        odd = [
            (2**k * self.feature_size, h)
            for k, h in enumerate(self.num_heads)
            if (2**k * self.feature_size) % h
        ]
        if odd:
            raise EncoderConfigError(
                f"{self.name}: stage widths must be divisible by their heads; (width, heads) {odd} are not."
            )
        check_budget(
            self,
            self.estimated_parameters(),
            f"feature_size {self.feature_size}, depths {self.depths}, window_size {self.window_size}",
        )

    def estimated_parameters(self) -> int:
        """Parameters + buffers MONAI's SwinUNETR allocates for this config (its decoder is built too).

        Within a few percent for the registered sizes; the terms that can explode are exact: the
        stage widths squared times depths, and each block's (window^3)^2 relative-position index.
        """
        f, w = self.feature_size, self.window_size
        total = self.in_chans * self.patch_size**3 * f + f
        for k, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
            dim = f * 2**k
            block = (4 + 2 * self.mlp_ratio) * dim * dim + (2 * w - 1) ** 3 * heads + w**6
            merging = 16 * dim * dim
            total += depth * block + merging + (54 * dim * dim if self.use_v2 else 0)
        # encoder1..4, encoder10 residual blocks, then the five up blocks and the output conv.
        total += 27 * self.in_chans * f + 28 * f * f + 54 * (4 + 16 + 256) * f * f
        total += 99 * (64 + 16 + 4 + 1) * f * f + 91 * f * f
        return int(total)
