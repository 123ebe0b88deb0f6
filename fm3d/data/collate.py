"""The one collate of fm3d's loaders: a list of sample dicts -> the batch dict of docs/datasets.md."""

from __future__ import annotations

from typing import Any

import torch


def collate_samples(samples: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Stack samples into a batch dict: tensors stacked, bools as a bool tensor, everything else listed.

    A batch a dataset already assembled (`CTDataset.__getitems__`) passes through unchanged.
    """
    if isinstance(samples, dict):
        return samples
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = values
    return batch
