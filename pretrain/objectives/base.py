"""The interface every pretraining objective implements, and the masking helper they share.

An objective is a plain `nn.Module` (it works without Lightning) that owns its heads and its
loss. The PretrainModule owns the one shared encoder; it reads `objective.views`, encodes
those batch entries once, and calls `objective(batch, encoded)`:

- `batch_keys` names every batch key the objective reads (its views included); the
  PretrainModule refuses, before the first step, a data module that does not serve them.
- `views` names batch keys holding images. `"image"` is `[B, 1, D, H, W]`. VoCo's
  `"voco_bases"` `[B, K, 1, d, h, w]` and `"voco_crops"` `[B, R, 1, d, h, w]` are flattened by
  the caller to `[B*K, 1, d, h, w]` / `[B*R, 1, d, h, w]` (sample-major: rows `b*K .. b*K+K-1`
  belong to sample b) before encoding, so `encoded[view]` holds that flattened batch.
- `forward(batch, encoded) -> (loss, metrics)`: the unweighted scalar loss and detached
  metrics; the caller weights the losses and logs metrics as `<objective>/<metric>`. Every
  call returns the same metric keys (DDP-synchronised logging would hang otherwise).
- Hooks with default no-ops:
  - `bind(encoder)`: called once, right after construction, with the shared encoder, for
    objectives that build parts from its config (MAE's decoder needs the patch grid) or copy
    it (DINO's EMA teacher). Keep the encoder itself out of the objective's submodules (its
    weights would be saved twice); hold plain values or a copy.
  - `encode(encoder, batch) -> dict[str, EncoderOutput]`: encodings only this objective
    needs, made its own way (MAE's visible tokens, iBOT's masked views); they are merged into
    `encoded` for this objective alone. Shared views stay in `views`, encoded once.
  - `on_train_batch_start(step, max_steps)`: before each training forward, with the optimizer
    step about to be taken and the run's total; schedules (temperatures, momentum) are
    functions of these two, so a resumed run continues them exactly.
  - `on_train_batch_end()` (after the optimizer step: VoCo's and DINO's EMA teachers), and
    `reset_validation()`, `update_validation(batch, encoded)`, `compute_validation() ->
    dict[str, float]` for metrics over a whole validation epoch (AUROC, C-index, retrieval);
    `compute_validation` gathers across DDP ranks itself.
  - `exported_encoder_prefix`: None, or the state-dict prefix (inside the objective) of an
    encoder the run should export instead of the shared one (DINO's teacher).

A missing modality (`has_report` / `has_ehr` False) is a mask: heads still run on those rows
and their loss terms are multiplied by 0, so every trainable parameter takes part in every
step on every rank and DDP never waits for an unused parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fm3d.errors import Fm3dError
from fm3d.models.encoder import EncoderOutput


class ObjectiveError(Fm3dError, ValueError):
    """A batch or a setting an objective cannot work with (missing key, wrong shape, bad option)."""


class Objective(nn.Module):
    """Base class of the pretraining objectives: see the module docstring for the contract."""

    name: str = "objective"
    views: tuple[str, ...] = ("image",)
    batch_keys: tuple[str, ...] = ("image",)

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    exported_encoder_prefix: str | None = None

    def bind(self, encoder: nn.Module) -> None:
        """Called once with the shared encoder, before any step (see the module docstring)."""

    def encode(self, encoder: nn.Module, batch: Mapping[str, object]) -> dict[str, EncoderOutput]:
        """Encodings this objective makes itself, keyed by name; merged into its `encoded`."""
        return {}

    def on_train_batch_start(self, step: int, max_steps: int) -> None:
        """Called before each training forward with the optimizer step and the run's total steps."""

    def on_train_batch_end(self) -> None:
        """Called by the PretrainModule after each training batch's optimizer step."""

    def reset_validation(self) -> None:
        """Forget what `update_validation` accumulated (start of a validation epoch)."""

    def update_validation(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]) -> None:
        """Accumulate what the epoch-level validation metrics need from one batch."""

    def compute_validation(self) -> dict[str, float]:
        """Epoch-level validation metrics over everything accumulated, on all ranks."""
        return {}


def require(batch: Mapping[str, object], key: str, objective: str) -> object:
    """`batch[key]`, or an ObjectiveError saying which objective needs it and who provides it."""
    if key not in batch:
        raise ObjectiveError(
            f"the {objective} objective needs batch[{key!r}] but the batch has only {sorted(batch)}; "
            "enable the matching data in the data module (see docs/objectives.md)"
        )
    return batch[key]


def row_mask(batch: Mapping[str, object], key: str, size: int, device: torch.device) -> torch.Tensor:
    """bool [B] mask `batch[key]` (all True when the batch carries no such key)."""
    if key not in batch:
        return torch.ones(size, dtype=torch.bool, device=device)
    mask = torch.as_tensor(batch[key], device=device).to(torch.bool).reshape(-1)
    if mask.numel() != size:
        raise ObjectiveError(f"batch[{key!r}] has {mask.numel()} entries but the batch has {size} rows")
    return mask


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean of `values` over `mask` that keeps masked entries in the graph with gradient 0.

    `torch.where` (not indexing) keeps every entry in the autograd graph, so parameters that
    only produced masked rows still receive a (zero) gradient. Masked entries are replaced
    before summing, so they never reach the loss value; callers keep them finite anyway
    (sanitised inputs), because an infinite local derivative times 0 would still give NaN in
    backward. With an all False mask the result is an exact 0 connected to the graph.
    """
    mask = mask.expand_as(values)
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if denominator is None:
        denominator = mask.sum().clamp_min(1)
    return kept.sum() / denominator
