"""One pretraining step counted on the meta device: FLOPs, activations kept for backward, tokens.

`fm3d pretrain plan` (pretrain.plan) builds a PretrainModule from its config, moves it to the
meta device and runs one training step on a batch of 1 cut by the config's own views from a
blank volume: nothing is computed, `torch.utils.flop_counter.FlopCounterMode` counts the
FLOPs, and a saved-tensors hook adds up what autograd keeps for the backward pass. Masks and
indices keep their real values beside the meta tensors (`MetaValues`), so MAE and iBOT steps
count the tokens their masks keep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakTensorKeyDictionary

from fm3d.data.collate import collate_samples
from fm3d.data.datamodule import CTDataModule
from fm3d.data.views import ViewContext
from fm3d.models.registry import encoder_from_config
from fm3d.spec import InputSpec
from pretrain.module import PretrainModule


@dataclass
class StepMeasure:
    """One training step at batch 1 on the meta device: FLOPs by part and the bytes kept for backward."""

    forward_flops: int
    backward_flops: int
    flops_by_part: dict[str, int]  # forward FLOPs of the encoder and of each objective
    saved_bytes: int
    tokens: dict[str, tuple[int, int]]  # view -> (tokens per encoder input, encoder inputs per sample)

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops


class MetaValues(TorchDispatchMode):
    """Gives the meta device the values of the batch's masks and indices, so masked steps count right.

    Meta tensors have shapes but no values, so `nonzero`, boolean indexing and `.item()` cannot
    run on them, and an MAE or iBOT step would not know how many tokens its mask keeps. The
    batch's non-float tensors (masks, indices) are registered with their real CPU values; every
    op whose meta inputs all have values is also run on the values (these tensors are small), so
    masks stay known through `~`, `sum`, `argsort` and views. A data-dependent op on a tensor
    without values assumes the most expensive case: every element true.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values = WeakTensorKeyDictionary()

    def register(self, meta: torch.Tensor, value: torch.Tensor) -> None:
        self.values[meta] = value

    def _value(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return self.values.get(tensor) if tensor.device.type == "meta" else None

    def _index_positions(self, index: torch.Tensor | None) -> list[torch.Tensor | None]:
        """A boolean index as long indices of its true elements (meta, the real count); others unchanged."""
        if index is None or index.dtype not in (torch.bool, torch.uint8):
            return [index]
        value = self._value(index)
        count = int(value.count_nonzero()) if value is not None else index.numel()
        return [torch.empty(count, dtype=torch.long, device="meta") for _ in range(index.ndim)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        metas = [x for x in flat if isinstance(x, torch.Tensor) and x.device.type == "meta"]
        if func is torch.ops.aten.index.Tensor and metas:
            source, indices = args[0], args[1]
            positions = [p for index in indices for p in self._index_positions(index)]
            if all(self._value(x) is not None for x in (source, *[i for i in indices if i is not None])):
                pass  # every input has values: computed on them below
            else:
                return func(source, positions)
        if metas and all(self._value(x) is not None for x in metas):
            real_flat = [self._value(x) if isinstance(x, torch.Tensor) and x.device.type == "meta" else x
                         for x in flat]  # fmt: skip
            real_args, real_kwargs = tree_unflatten(real_flat, spec)
            real = func(*real_args, **real_kwargs)
            if func._schema.is_mutable:
                return func(*args, **kwargs)
            if not isinstance(real, torch.Tensor | tuple | list):
                return real  # .item() and other scalars: the real value
            out_flat, out_spec = tree_flatten(real)
            metas_out = []
            for value in out_flat:
                if isinstance(value, torch.Tensor):
                    meta = value.to("meta")
                    self.register(meta, value)
                    metas_out.append(meta)
                else:
                    metas_out.append(value)
            return tree_unflatten(metas_out, out_spec)
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func is torch.ops.aten.nonzero.default:
                return torch.empty((first.numel(), first.ndim), dtype=torch.long, device="meta")
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if first.dtype == torch.bool else 1
        return func(*args, **kwargs)


def _parts(module: PretrainModule) -> dict[str, str]:
    """FLOP-counter names of the step's outermost modules -> the config's names for them.

    The counter names a module by the class of the outermost module called; the step calls the
    encoder and each objective directly.
    """
    parts = {type(module.encoder).__name__: f"encoder ({module.encoder_name})"}
    parts.update(
        {type(objective).__name__: f"objective {name}" for name, objective in module.objectives.items()}
    )
    return parts


def training_loss(module: PretrainModule, batch: dict, tokens: dict[str, tuple[int, int]] | None = None):
    """The weighted loss `PretrainModule.training_step` computes, without its logging (no Trainer here).

    `tokens`, when given, receives each encoded view's tokens per input and inputs per sample.
    """
    batch_size = len(batch["study_id"])
    encoded = module.encode(batch)
    total = None
    for name, objective in module.objectives.items():
        own = objective.encode(module.encoder, batch)
        seen = {**encoded, **own}
        if tokens is not None:
            for view, output in seen.items():
                tokens.setdefault(view, (output.tokens.shape[1], output.tokens.shape[0] // batch_size))
        loss, _ = objective(batch, seen)
        weighted = module.loss_weights[name] * loss
        total = weighted if total is None else total + weighted
    return total


def measure_step(module: PretrainModule, batch: dict, values: MetaValues | None = None) -> StepMeasure:
    """Forward + backward of one step on `batch` (on the module's device) under the FLOP counter.

    Bytes kept for backward count each storage once and leave out parameters and buffers
    (weights are saved for backward too, but they are model state, not activations).
    """
    state = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in state:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    tokens: dict[str, tuple[int, int]] = {}
    names = _parts(module)
    values = values or MetaValues()
    # One counter over forward and backward: it attributes backward FLOPs to modules through
    # hooks it sets during the forward pass.
    # One counter over forward and backward; the split by part is the forward's, which the
    # counter attributes to the outermost modules called (its backward attribution is not).
    with FlopCounterMode(display=False) as counter, values:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = training_loss(module, batch, tokens)
        forward_flops = counter.get_total_flops()
        forward_parts = counter.get_flop_counts()
        loss.backward()
    by_part: dict[str, int] = {}
    for path, counts in forward_parts.items():
        part = names.get(path, "other" if path != "Global" and "." not in path else None)
        if part is not None:
            by_part[part] = by_part.get(part, 0) + sum(counts.values())
    return StepMeasure(
        forward_flops=forward_flops,
        backward_flops=counter.get_total_flops() - forward_flops,
        flops_by_part=by_part,
        saved_bytes=sum(saved.values()),
        tokens=tokens,
    )


def planning_batch(module: PretrainModule, datamodule: CTDataModule, input_spec: InputSpec) -> dict[str, Any]:
    """One sample as the data module would serve it (batch 1), cut by its views from a blank volume.

    Keys the views do not write are what the objectives read: a report of `max_length` tokens
    (or its cached embedding), and EHR label rows of the objectives' widths.
    """
    spec = datamodule.spec
    context = ViewContext(spec.window, spec.intensity_range, None, False, input_spec.target_spacing_mm)
    sizes = [shape[-3:] for view in spec.views for shape in view.shapes().values()]
    volume_shape = tuple(int(max(size[axis] for size in sizes)) for axis in range(3)) if sizes else (1, 1, 1)
    volume = np.full(volume_shape, int(spec.window[0]), dtype=np.int16)
    rng = np.random.default_rng(0)
    sample: dict[str, Any] = {"study_id": "plan"}
    for view in spec.views:
        sample.update(view.fill(volume, rng, context, {}))
    wanted = {key for objective in module.objectives.values() for key in objective.batch_keys}
    for objective in module.objectives.values():
        clip = getattr(objective, "clip", None)
        if clip is not None and "report" in wanted:
            # Long enough to fill max_length tokens: the text tower's most expensive input.
            sample["report"] = " ".join(["opacity"] * (clip.config.max_length * 2))
        if clip is not None and "report_embedding" in wanted:
            sample["report_embedding"] = torch.zeros(clip.text_projection.in_features)
        if "report" in wanted or "report_embedding" in wanted:
            sample["has_report"] = True
        if (width := getattr(objective, "num_phenotypes", None)) is not None:
            sample["phenotype"], sample["has_ehr"] = torch.zeros(int(width)), True
        if (width := getattr(objective, "num_tasks", None)) is not None:
            sample["tte_time"] = torch.full((int(width),), 365.0)
            sample["tte_event"] = torch.ones(int(width), dtype=torch.bool)
            sample["has_ehr"] = True
    return collate_samples([sample])


def _on_meta(batch: Mapping[str, Any], values: MetaValues) -> dict[str, Any]:
    """The batch on the meta device; its masks and indices keep their values in `values`."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to("meta")
            if not value.is_floating_point():
                values.register(moved[key], value)
        else:
            moved[key] = value
    return moved


def _encoder_with_checkpointing(module: PretrainModule, enabled: bool) -> torch.nn.Module:
    """The module's encoder rebuilt with activation checkpointing `enabled`, on the meta device.

    Built on CPU and then moved: some families cannot be built on the meta device (MONAI's Swin
    reads values while it builds). The RNG is forked, so building draws nothing from the run's stream.
    """
    config = module.encoder.config.to_dict()
    config["grad_checkpointing"] = enabled
    with torch.random.fork_rng(devices=[]):
        return encoder_from_config(config).to("meta")


def measure(module: PretrainModule, batch: dict, steps: int = 1) -> tuple[StepMeasure, int, int]:
    """The recipe's step, and the activation bytes kept with and without encoder checkpointing.

    The module goes to the meta device (it is not used for training afterwards). The
    checkpointing variant swaps in a meta copy of the encoder; objectives that hold their own
    encoder (DINO's teacher) keep theirs, which runs without gradients either way.
    """
    module.to("meta")
    module.train()
    for objective in module.objectives.values():
        objective.on_train_batch_start(0, steps)
    values = MetaValues()
    batch = _on_meta(batch, values)
    own = module.encoder
    recipe = measure_step(module, batch, values)
    other: dict[bool, int] = {}
    try:
        for enabled in (False, True):
            if enabled == bool(own.config.grad_checkpointing):
                other[enabled] = recipe.saved_bytes
                continue
            module.encoder = _encoder_with_checkpointing(module, enabled)
            module.zero_grad(set_to_none=True)
            other[enabled] = measure_step(module, batch, values).saved_bytes
    finally:
        module.encoder = own
    return recipe, other[False], other[True]


def measure_cpu_step(module: PretrainModule, batch: dict, repeats: int = 2) -> tuple[float, int]:
    """Seconds of one real CPU training step (forward + backward, best of `repeats`) and its counted FLOPs.

    For checking the meta count against a real step (implied GFLOP/s); tiny configs only. The
    real count lacks attention: torch's counter has no formula for the CPU flash-attention
    kernel, which the meta device does not take (it counts attention's matmuls).
    """
    module.train()
    for objective in module.objectives.values():
        objective.on_train_batch_start(0, 1)
    with FlopCounterMode(display=False) as counter:
        training_loss(module, batch).backward()
    best = math.inf
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        training_loss(module, batch).backward()
        best = min(best, time.perf_counter() - start)
    return best, counter.get_total_flops()
