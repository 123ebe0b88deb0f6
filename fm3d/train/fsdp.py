"""FSDP2 data parallelism: every process holds 1/N of each parameter, gradient and optimizer state.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with the mesh fixed to pure data
parallelism over every process (no tensor parallelism), so a config needs no mesh sizes and
the same preset runs on 2 CPU processes (gloo) or 8 nodes of GPUs (NCCL). Lightning leaves the
sharding itself to the LightningModule's `configure_model`, which calls `shard_module` on each
module whose forward it calls: `fully_shard` on every element of every `nn.ModuleList` inside
(the transformer blocks of an encoder, the layers of a Hugging Face text tower, the blocks of a
DINO teacher), inner lists first, then on the module itself, so one block's parameters are
gathered at a time. A unit's parameters are gathered when its `forward` runs; methods that use
them otherwise must be registered (`extra_forward_methods`).
Activation checkpointing stays the encoder's own per-block switch (`model.grad_checkpointing`),
which composes with FSDP2 because it runs inside the sharded block.

Checkpoints are distributed (each rank writes its shards into a `last.ckpt/` folder, DCP) by
default, so no rank ever holds the whole optimizer state; `read_checkpoint_state` reads either
kind back into one state dict for the export.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

MIXED_PRECISION = {
    # Parameters gathered and computed in bf16; gradients reduced and kept in fp32 (DeepSpeed and
    # torchtitan's default): bf16 reductions over many ranks lose the small updates.
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp32": MixedPrecisionPolicy(),
}


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over all processes of all nodes.

    Args:
        mixed_precision: "fp32" (default) or "bf16": the dtype parameters are gathered and computed in
            (gradients are reduced in fp32 either way). Keep the Trainer's precision at "32-true".
        reshard_after_forward: free gathered parameters after each block's forward (less memory,
            one more all-gather per block in backward); False keeps them until backward (ZeRO-2).
        save_distributed_checkpoint: write checkpoints as per-rank shards (a folder); False
            gathers full weights and optimizer state into one file on rank 0.
        process_group_backend: "gloo" or "nccl"; default: by device.
        timeout: of collectives.
    """

    def __init__(
        self,
        mixed_precision: Literal["fp32", "bf16"] = "fp32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {sorted(MIXED_PRECISION)}, got {mixed_precision!r}"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        self._data_parallel_size = self.world_size  # every process is one data-parallel replica

    @property
    def data_parallel_mesh(self) -> DeviceMesh:
        """The 1-D mesh of all processes that `shard_module` shards over."""
        return self.device_mesh["data_parallel"]


def shard_module(
    module: nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: str = "fp32",
    reshard_after_forward: bool = True,
    extra_forward_methods: tuple[str, ...] = (),
) -> int:
    """Apply FSDP2 to `module` in place: each `nn.ModuleList` element, inner first, then `module`.

    `extra_forward_methods`: methods of `module` other than `forward` that read its parameters
    (an objective's `encode`); they gather the parameters as `forward` does.
    Scalar parameters (CLIP's `logit_scale`), which FSDP2 cannot shard, stay whole on every rank
    and have their gradients averaged over the mesh as DDP would. Idempotent (a module already
    sharded is left alone). Returns how many units were sharded.
    """
    if isinstance(module, FSDPModule):
        return 0
    scalars = {p for p in module.parameters() if p.ndim == 0}
    settings: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MIXED_PRECISION[mixed_precision],
        "reshard_after_forward": reshard_after_forward,
        "ignored_params": scalars,
    }
    units = 0
    # modules() is pre-order: reversed, every inner list's elements come before the lists holding them.
    for parent in reversed(list(module.modules())):
        if isinstance(parent, nn.ModuleList):
            for block in parent:
                if any(p.numel() for p in block.parameters()) and not isinstance(block, FSDPModule):
                    fully_shard(block, **settings)
                    units += 1
    fully_shard(module, **settings)
    for name in extra_forward_methods:
        register_fsdp_forward_method(module, name)
    group = mesh.get_group()
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(partial(_average_gradient, group=group))
    return units + 1


def _average_gradient(param: torch.Tensor, group: dist.ProcessGroup) -> None:
    # SUM then divide: gloo has no AVG reduction.
    dist.all_reduce(param.grad, group=group)
    param.grad.div_(dist.get_world_size(group))


def gradient_norm(module: nn.Module) -> torch.Tensor | None:
    """The L2 norm of all of `module`'s gradients, whole even where they are FSDP2 shards; None without any.

    Sharded (DTensor) gradients are reduced in one collective, so every rank must call it.
    """
    sharded, whole = [], []
    for param in module.parameters():
        if param.grad is not None:
            (sharded if isinstance(param.grad, DTensor) else whole).append(param.grad)
    if not sharded and not whole:
        return None
    squares = torch.zeros((), dtype=torch.float32, device=(sharded or whole)[0].device)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    if whole:
        squares = squares + torch.nn.utils.get_total_norm(whole).float() ** 2
    return squares.sqrt()


def gathered_state_dict(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The module's full state dict (collective: every rank must call it); complete on rank 0.

    Under FSDP2 the strategy's own `lightning_module_state_dict` returns this rank's shards (what
    a distributed checkpoint stores); an export needs whole tensors.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, FSDP2Strategy):
        return strategy.lightning_module_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model `state_dict` of a Lightning checkpoint: a file, or a distributed (DCP) folder.

    A DCP folder is read in this process alone (no process group), into CPU memory.
    """
    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(prefix="fm3d-dcp-") as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            return torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)["state_dict"]
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
