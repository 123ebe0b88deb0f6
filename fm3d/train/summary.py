"""The block every training command ends with: where its outputs went and how to browse them.

fm3d pretrain fit: done
  run folder   /abs/runs/demo/20260101-120000  (also runs/demo/latest)
  best ckpt    .../checkpoints/best.ckpt  (val/clip/loss 1.2345 at epoch 41, step 1312)
  last ckpt    .../checkpoints/last.ckpt
  exported     .../export/encoder, .../export/clip  (from best.ckpt: epoch 41, step 1312)
  metrics      .../metrics.json
  MLflow       sqlite:////abs/runs/mlflow.db  run 3f2a...  (browse: mlflow ui --backend-store-uri ...)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

METRICS_FILE = "metrics.json"


def scalar_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The finite scalar entries of a trainer's `callback_metrics`, as floats, sorted by name."""
    out = {}
    for key, value in sorted(metrics.items()):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, float | int) and math.isfinite(value):
            out[key] = float(value)
    return out


def write_metrics(path: Path, metrics: Mapping[str, float]) -> Path:
    """Write the final metrics of a run as JSON (name -> value) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics), indent=1) + "\n")
    return path


@dataclass
class RunSummary:
    """What a finished command tells its user; `render()` is the printed block."""

    command: str
    run_dir: Path
    latest: Path | None = None
    best: str | None = None
    last: Path | None = None
    exported: list[Path] = field(default_factory=list)
    export_source: str | None = None
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics_file: Path | None = None
    tracking_uri: str | None = None
    run_id: str | None = None

    def render(self) -> str:
        rows = [
            ("run folder", str(self.run_dir.resolve()) + (f"  (also {self.latest})" if self.latest else ""))
        ]
        if self.best:
            rows.append(("best ckpt", self.best))
        if self.last is not None:
            rows.append(("last ckpt", str(self.last.resolve())))
        if self.exported:
            source = f"  ({self.export_source})" if self.export_source else ""
            rows.append(("exported", ", ".join(str(p.resolve()) for p in self.exported) + source))
        rows += [(name, str(path.resolve())) for name, path in self.outputs.items()]
        if self.metrics_file is not None:
            rows.append(("metrics", str(self.metrics_file.resolve())))
        if self.tracking_uri:
            run = f"  run {self.run_id}" if self.run_id else ""
            browse = (
                f"  (browse: mlflow ui --backend-store-uri {self.tracking_uri})"
                if self.tracking_uri.startswith("sqlite:")
                else ""
            )
            rows.append(("MLflow", f"{self.tracking_uri}{run}{browse}"))
        return "\n".join([f"{self.command}: done", *(f"  {name:<12} {value}" for name, value in rows)])
