"""The CLIP text tower's three modes trained through `fm3d pretrain fit`: full, LoRA, frozen on a cache."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from fm3d.cli import main as fm3d_main
from fm3d.clip import load_clip
from fm3d.text_cache_cli import main as text_cache_main


@pytest.fixture(scope="module")
def text_cache(demo_cohort, tmp_path_factory) -> Path:
    """The cohort's reports (findings + impression, as the data module joins them) embedded once."""
    out = tmp_path_factory.mktemp("text_cache") / "cache"
    status = text_cache_main([
        "build", "--model", str(demo_cohort["text_model"]), "--reports",
        str(demo_cohort["root"] / "manifest.parquet"), "--columns", "findings", "impression",
        "--max-length", "32", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert status == 0
    return out


def _fit(demo_cohort, run_config, tmp_path: Path, mode: str, cache: Path | None) -> tuple[int, str, Path]:
    config_file = run_config(demo_cohort, tmp_path / "run.yaml", objectives=("clip",), max_steps=2,
                             limit_train_batches=2, limit_val_batches=1)  # fmt: skip
    config = json.loads(config_file.read_text())
    config["model"]["objectives"]["clip"]["init_args"]["text_mode"] = mode
    if cache is not None:
        config["data"]["text_embeddings"] = str(cache)
    config_file.write_text(json.dumps(config))
    errors = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        status = fm3d_main(
            ["pretrain", "fit", "--config", str(config_file), "--runs_root", str(tmp_path / "runs")]
        )
    return status, errors.getvalue(), tmp_path / "runs" / "test" / "latest"


@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_each_text_mode_trains_through_the_cli(demo_cohort, run_config, text_cache, tmp_path, mode) -> None:
    status, errors, run = _fit(
        demo_cohort, run_config, tmp_path, mode, text_cache if mode == "frozen" else None
    )
    assert status == 0, errors[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    text_weights = [k for k in state if ".clip.text." in k]
    lora_weights = [k for k in text_weights if "lora_" in k]
    if mode == "frozen":  # no text model in the run at all: the loader served cached embeddings
        assert text_weights == []
    elif mode == "lora":
        assert lora_weights and len(lora_weights) < len(text_weights)
    else:
        assert text_weights and not lora_weights
    assert "val/clip/loss" in json.loads((run / "metrics.json").read_text())

    exported = load_clip(run / "export" / "clip")  # every mode exports a CLIP model that embeds reports
    with torch.no_grad():
        embedded = exported.encode_text(["No acute findings.", "Nodule in the right upper lobe."])
    assert embedded.shape == (2, 16) and torch.isfinite(embedded).all()


def test_a_frozen_run_refuses_a_cache_built_with_other_settings(demo_cohort, run_config, tmp_path) -> None:
    other = tmp_path / "other_cache"
    status = text_cache_main([
        "build", "--model", str(demo_cohort["text_model"]), "--reports",
        str(demo_cohort["root"] / "manifest.parquet"), "--columns", "findings", "impression",
        "--max-length", "24", "--pooling", "mean", "--out", str(other), "--no-progress",
    ])  # fmt: skip
    assert status == 0
    status, errors, _ = _fit(demo_cohort, run_config, tmp_path, "frozen", other)
    assert status == 2
    assert "objective 'clip'" in errors and "pooling: cache 'mean', this run 'cls'" in errors
    assert "max_length: cache 24, this run 32" in errors
