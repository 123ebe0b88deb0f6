"""Folding peft LoRA adapters back into the weights they adapt.

Shared by everything that trains adapters and saves a plain model: the fine-tuned encoder
(`downstream.strategies`, `lora` strategy) and the CLIP text tower (`fm3d.text`, `lora` mode).
"""

from __future__ import annotations

from torch import nn


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base Linear weights and drop the wrappers (in place).

    The result has the module's original parameter names again, so it saves and loads as the
    plain model it was before the adapters were injected.
    """
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
    return module
