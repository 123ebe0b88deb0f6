"""Fine-tune strategies shared by every downstream task: frozen, full (with LLRD) and LoRA.

- `frozen`: the encoder's weights never change (requires_grad off, kept in eval mode so dropout
  and normalisation statistics do not move either); only the task head trains — a linear probe
  when the head is linear.
- `full`: every weight trains, with layer-wise learning-rate decay (BEiT/MAE recipe). The
  encoder's family declares how its parameters are numbered (`EncoderFamily.layer_id`): 0 for
  the embeddings, i + 1 for block i, depth + 1 for what follows the last block. A parameter of
  layer l gets `lr * layer_decay ** (depth + 1 - l)`; the task head gets `lr`. So with 12
  blocks and decay 0.75 block 11 trains at 0.75 x lr and the patch embedding at 0.75^13 x lr.
- `lora`: peft LoRA adapters on the projections the family declares (`EncoderFamily.
  lora_targets`: attention qkv/proj and MLP fc1/fc2 for vit3d, linear1/linear2 for MONAI's
  Swin); `lora_targets` overrides them. The encoder's own weights stay frozen and only the
  adapters and the head train, all at `lr`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fm3d.errors import Fm3dError
from fm3d.models.registry import encoder_family, get_family, list_families
from fm3d.train.optim import is_no_decay

logger = logging.getLogger(__name__)

StrategyName = Literal["frozen", "full", "lora"]
STRATEGIES: tuple[str, ...] = ("frozen", "full", "lora")


class StrategyError(Fm3dError, ValueError):
    """A fine-tune strategy that cannot be applied to the given encoder."""


@dataclass
class FinetuneStrategy:
    """How the encoder is adapted: which weights train and at which learning rate.

    name: "frozen", "full" or "lora".
    layer_decay: LLRD factor for "full" (1.0 = same lr everywhere).
    lora_rank, lora_alpha, lora_dropout: LoRA adapter size, scale (alpha / rank) and dropout.
    lora_targets: module-name suffixes that get adapters (only `nn.Linear` modules are wrapped);
        None takes those the encoder's family declares.
    """

    name: StrategyName = "frozen"
    layer_decay: float = 0.75
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise StrategyError(f"unknown fine-tune strategy {self.name!r}; choose one of {STRATEGIES}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise StrategyError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.lora_rank < 1:
            raise StrategyError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)


def _lora_target_modules(encoder: nn.Module, suffixes: Iterable[str]) -> list[str]:
    """Full names of the Linear modules whose name ends with one of the dotted `suffixes`."""
    return [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith(f".{s}") for s in suffixes)
    ]


def lora_targets(encoder: nn.Module, strategy: FinetuneStrategy) -> tuple[str, ...]:
    """The module-name suffixes LoRA adapts: the strategy's own, else those of the encoder's family."""
    if strategy.lora_targets is not None:
        return strategy.lora_targets
    family = encoder_family(encoder)
    if family is None or not family.lora_targets:
        described = f"encoder family {family.name!r}" if family else type(encoder).__name__
        raise StrategyError(
            f"{described} declares no LoRA targets; set strategy.lora_targets to the encoder's "
            "nn.Linear module names (e.g. [attn.qkv, attn.proj])"
        )
    return family.lora_targets


def apply_strategy(encoder: nn.Module, strategy: FinetuneStrategy) -> nn.Module:
    """Prepare `encoder` for `strategy` in place (freeze, or inject LoRA adapters) and return it."""
    if strategy.name == "full":
        encoder.requires_grad_(True)
        return encoder
    encoder.requires_grad_(False)
    if strategy.name == "frozen":
        return encoder.eval()
    from peft import LoraConfig, inject_adapter_in_model  # peft is only needed for this strategy

    suffixes = lora_targets(encoder, strategy)
    targets = _lora_target_modules(encoder, suffixes)
    if not targets:
        raise StrategyError(
            f"LoRA found no nn.Linear named {list(suffixes)} in {type(encoder).__name__}; "
            "set strategy.lora_targets to the encoder's projection names"
        )
    config = LoraConfig(
        r=strategy.lora_rank,
        lora_alpha=strategy.lora_alpha,
        lora_dropout=strategy.lora_dropout,
        target_modules=targets,
    )
    encoder = inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_("lora_" in name)
    logger.info("LoRA rank %d on %d projections", strategy.lora_rank, len(targets))
    return encoder


def layer_scales(encoder: nn.Module, layer_decay: float) -> dict[str, float]:
    """The LLRD multiplier of every encoder parameter, by name (see the module docstring)."""
    family = encoder_family(encoder)
    if family is None or family.layer_id is None:
        if layer_decay != 1.0:
            numbered = [name for name in list_families() if get_family(name).layer_id is not None]
            raise StrategyError(
                f"{type(encoder).__name__} declares no layer ids, so layer-wise lr decay cannot be "
                f"applied; set strategy.layer_decay: 1.0 (families with layer ids: {numbered})"
            )
        return {name: 1.0 for name, _ in encoder.named_parameters()}
    depth = family.depth(encoder.config)
    return {
        name: layer_decay ** (depth + 1 - min(family.layer_id(name, depth), depth + 1))
        for name, _ in encoder.named_parameters()
    }


def parameter_groups(
    encoder: nn.Module,
    head: Iterable[tuple[str, nn.Parameter]],
    strategy: FinetuneStrategy,
    lr: float,
    weight_decay: float,
) -> list[dict]:
    """Optimizer parameter groups for `strategy`: one group per (lr, weight-decay) pair.

    `head` are the task's own (named) parameters; they always train at `lr`. Each group carries
    `lr` and `lr_scale` so a scheduler can rescale it, and a `name` for logging.
    """
    scales = layer_scales(encoder, strategy.layer_decay) if strategy.name == "full" else {}
    groups: dict[tuple[str, float, bool], dict] = {}

    def add(prefix: str, name: str, param: nn.Parameter, scale: float) -> None:
        no_wd = is_no_decay(name, param)
        key = (prefix, scale, no_wd)
        if key not in groups:
            groups[key] = {
                "name": f"{prefix}_lr{scale:.4g}{'_no_wd' if no_wd else ''}",
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_wd else weight_decay,
            }
        groups[key]["params"].append(param)

    for name, param in encoder.named_parameters():
        if param.requires_grad:
            add("encoder", name, param, scales.get(name, 1.0))
    for name, param in head:
        if param.requires_grad:
            add("head", name, param, 1.0)
    return list(groups.values())
