"""Fixtures of the pretraining tests: a tiny offline text model and contract-shaped batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fm3d.text import init_text_model

# A 16^3 volume with 8^3 patches: 8 tokens, a few milliseconds per vit3d_tiny step on CPU.
TINY_ENCODER = {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}
REPORTS = [
    "liver lesion in segment four",
    "normal chest ct without findings",
    "kidney stone in the left kidney",
    "small pleural effusion on the right",
]


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A from-scratch 1-layer BERT with a WordPiece vocabulary learned on a few reports."""
    directory = tmp_path_factory.mktemp("text_model")
    return init_text_model(directory, REPORTS * 4, vocab_size=80, hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="session")
def batch_factory():
    """`make_batch(batch_size, ...)`: contract-shaped batches (see below)."""
    return make_batch


def make_batch(
    batch_size: int,
    num_phenotypes: int = 3,
    num_tasks: int = 2,
    has_report: bool | list[bool] = True,
    has_ehr: bool | list[bool] = True,
    seed: int = 0,
) -> dict:
    """A batch in the data contract (ARCHITECTURE.md) with random 16^3 images and labels."""
    g = torch.Generator().manual_seed(seed)
    mask = lambda v: torch.tensor([v] * batch_size if isinstance(v, bool) else v)  # noqa: E731
    reports = mask(has_report)
    ehr = mask(has_ehr)
    return {
        "image": torch.randn(batch_size, 1, 16, 16, 16, generator=g),
        "study_id": [f"s{seed}-{i}" for i in range(batch_size)],
        "report": [REPORTS[(seed + i) % len(REPORTS)] if reports[i] else "" for i in range(batch_size)],
        "has_report": reports,
        "phenotype": (torch.rand(batch_size, num_phenotypes, generator=g) > 0.5).float() * ehr[:, None],
        "has_ehr": ehr,
        "tte_time": torch.rand(batch_size, num_tasks, generator=g) * 1000 * ehr[:, None],
        "tte_event": (torch.rand(batch_size, num_tasks, generator=g) > 0.5) & ehr[:, None],
    }


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 24-study demo cohort run through the real chain: demo-data, ehr labels, prepare, text model.

    Returns the paths a run config needs: cache, labels, text_model (and root).
    """
    import polars as pl

    from fm3d.cli import main as fm3d_main

    root = tmp_path_factory.mktemp("demo")
    assert fm3d_main(["demo-data", "--out", str(root), "--studies", "24", "--seed", "0"]) == 0
    assert (
        fm3d_main(
            [
                "ehr",
                "labels",
                "--meds",
                str(root / "meds"),
                "--studies",
                str(root / "manifest.parquet"),
                "--out",
                str(root / "labels.parquet"),
                "--phenotypes",
                str(root / "phenotypes.yaml"),
                "--tasks-k",
                "4",
            ]
        )
        == 0
    )
    assert (
        fm3d_main(
            [
                "prepare",
                "--manifest",
                str(root / "manifest.parquet"),
                "--out",
                str(root / "cache"),
                "--spacing",  # not the default (3, 1.5, 1.5): exported encoders must report it
                "3",
                "2",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = pl.read_parquet(root / "manifest.parquet")
    texts = [
        f"{f or ''}\n{i or ''}" for f, i in zip(manifest["findings"], manifest["impression"], strict=True)
    ]
    text_model = init_text_model(
        root / "text_model", texts, vocab_size=200, hidden_size=32, num_layers=1, num_heads=2, max_length=64
    )
    return {
        "root": root,
        "cache": root / "cache",
        "labels": root / "labels.parquet",
        "text_model": text_model,
    }


def tiny_run_config(
    cohort: dict[str, Path],
    path: Path,
    objectives: tuple[str, ...] = ("voco", "clip", "phenotype", "tte"),
    **trainer: object,
) -> Path:
    """Write a CLI config: vit3d_tiny on 16^3 views (VoCo: 32^3 crops), tiny heads, CPU.

    Objectives: "voco", "clip", "phenotype", "tte", "dino", "mae".
    """
    import json

    import polars as pl

    labels = pl.read_parquet(cohort["labels"])
    available = {
        "voco": {
            "class_path": "pretrain.objectives.voco.VoCoObjective",
            "init_args": {"version": "v2", "hidden_dim": 32, "out_dim": 16},
        },
        "clip": {
            "class_path": "pretrain.objectives.clip.ClipObjective",
            "init_args": {"text_model": str(cohort["text_model"]), "proj_dim": 16, "max_length": 32},
        },
        "phenotype": {
            "class_path": "pretrain.objectives.phenotype.PhenotypeObjective",
            "init_args": {"num_phenotypes": len(labels["phenotype"][0])},
        },
        "tte": {
            "class_path": "pretrain.objectives.tte.TimeToEventObjective",
            "init_args": {"num_tasks": len(labels["tte_time"][0]), "num_bins": 4, "rank": 4},
        },
        "dino": {
            "class_path": "pretrain.objectives.dino.DINOObjective",
            "init_args": {"prototypes": 32, "head_hidden_dim": 16, "bottleneck_dim": 8},
        },
        "mae": {
            "class_path": "pretrain.objectives.mae.MAEObjective",
            "init_args": {"decoder_dim": 12, "decoder_depth": 1, "decoder_heads": 2},
        },
    }
    # The views each objective reads besides the global view (16^3 inputs, 8^3 patches).
    own_views = {
        "voco": {"voco": {"geometry": "tiny"}},
        "dino": {
            "multicrop": {
                "global_size": [16, 16, 16],
                "local_size": [8, 8, 8],
                "num_local": 2,
                "global_extent_mm": [60, 120],
                "local_extent_mm": [20, 50],
                "patch_size": 8,
            }
        },
        "mae": {"mae": {"size": [16, 16, 16], "patch_size": 8, "mask_ratio": 0.75}},
    }
    config = {
        "name": "test",
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **trainer,
        },
        "model": {
            "encoder": "vit3d_tiny",
            "encoder_overrides": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8], "depth": 2},
            "objectives": {name: available[name] for name in objectives},
            "optimizer": {"lr": 1e-3, "warmup_steps": 2},
        },
        "data": {
            "cache_dir": str(cohort["cache"]),
            "labels": str(cohort["labels"]),
            "views": {
                "image": {"size": [16, 16, 16]},
                **{key: view for name in objectives for key, view in own_views.get(name, {}).items()},
            },
            "hu_window": [-175, 250],
            "intensity_range": [-1, 1],
            "loader": {"batch_size": 4, "num_workers": 0},
        },
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


@pytest.fixture(scope="session")
def run_config():
    """`tiny_run_config(cohort, path, objectives=..., **trainer)`: write a tiny CLI config."""
    return tiny_run_config
