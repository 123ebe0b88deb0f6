"""Every task config's `data.loader` block, parsed as `fm3d finetune` parses it, holds downstream's values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from downstream.registry import get_task

CONF = Path(__file__).resolve().parents[3] / "conf" / "downstream"
# What each config set before the loader settings became one block (batch size, workers).
LOADERS = {
    "classification": (4, 2),
    "report_generation": (4, 2),
    "retrieval": (8, 2),
    "segmentation": (2, 2),
    "survival": (4, 2),
    "zero_shot": (4, 2),
}


@pytest.mark.parametrize("task", sorted(LOADERS))
def test_task_configs_keep_their_loader_settings(task: str) -> None:
    config = yaml.safe_load((CONF / f"{task}.yaml").read_text())
    assert config["task"] == task
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(get_task(task).datamodule_class, "data")
    loader = parser.parse_object({"data": config["data"]}).data.loader
    assert (loader.batch_size, loader.num_workers) == LOADERS[task]
    assert tuple(loader.split_fractions) == (0.7, 0.15, 0.15) and loader.seed == 0
    assert loader.fixed_splits is None
    # A block that names only some settings keeps downstream's defaults for the others.
    partial = parser.parse_object({"data": {**config["data"], "loader": {"batch_size": 1}}}).data.loader
    assert tuple(partial.split_fractions) == (0.7, 0.15, 0.15) and partial.num_workers == 0
