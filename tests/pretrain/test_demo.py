"""The demo learns: after the CPU run of conf/pretrain/demo.yaml, the exported encoder retrieves
held-out studies from their reports well above chance and ranks time-to-event risk.

The chain is the demo's (demo-data -> ehr labels -> prepare -> text-model -> pretrain fit with
demo.yaml as shipped, paths aside) on the demo's 128-study cohort in a temporary folder.
demo.yaml holds 40% of the patients out (~50 studies) and exports the best checkpoint by
held-out image->report R@5 (model.monitor). Image->report recall@5 is recomputed
from the exported encoder and CLIP folders with fm3d.metrics.retrieval and must equal what the
run logged at the exported checkpoint's step.

The learning lines are hard assertions: R@5 >= 1.5x chance and C-index >= 0.55, both at the
exported checkpoint. An untrained encoder sits at chance (R@5 ~0.10 +- 0.04 on 50 studies,
C-index ~0.5), so it fails them; the measured runs clear them with margin (docs/pretraining.md,
'The demo'). The R@5 that picks the checkpoint is the one checked, so it is optimistic by the
selection; the C-index at that step is the less biased of the two figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

import fm3d
from fm3d.cli import main as fm3d_main
from fm3d.clip import load_clip
from fm3d.data.base import LoaderSettings
from fm3d.data.datamodule import CTDataModule
from fm3d.metrics.retrieval import recall_at_k
from fm3d.text_cli import main as text_model_main
from fm3d.train.tracking import local_tracking_uri

REPO = Path(__file__).resolve().parents[2]

# Learning lines at the exported (best) checkpoint: R@5 as a multiple of chance, C-index.
RECALL5_OVER_CHANCE = 1.5
C_INDEX = 0.55

pytestmark = pytest.mark.slow


def test_demo_run_retrieves_held_out_reports_and_ranks_risk(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    manifest = str(demo / "manifest.parquet")
    steps = [
        ["demo-data", "--out", str(demo), "--studies", "128", "--seed", "0", "--quiet"],
        ["ehr", "labels", "--meds", str(demo / "meds"), "--studies", manifest,
         "--phenotypes", str(demo / "phenotypes.yaml"), "--out", str(demo / "ehr_labels.parquet")],
        ["prepare", "--manifest", manifest, "--out", str(demo / "cache"), "--no-progress"],
    ]  # fmt: skip
    for step in steps:  # the commands scripts/demo.sh runs
        assert fm3d_main(step) == 0, step
    # `fm3d text-model` (called by its module: a checkout installed before the command existed
    # has no entry point for it).
    text_model = [
        "--out", str(demo / "text_model"), "--texts", manifest, "--columns", "findings", "impression",
        "--vocab-size", "500", "--hidden-size", "64", "--layers", "2", "--heads", "2", "--max-length", "128",
    ]  # fmt: skip
    assert text_model_main(text_model) == 0

    # demo.yaml itself, with the cohort's paths.
    config = yaml.safe_load((REPO / "conf" / "pretrain" / "demo.yaml").read_text())
    config["model"]["objectives"]["clip"]["init_args"]["text_model"] = str(demo / "text_model")
    config["data"].update(cache_dir=str(demo / "cache"), labels=str(demo / "ehr_labels.parquet"))
    config["trainer"]["enable_progress_bar"] = False
    (tmp_path / "demo.yaml").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    args = [
        "pretrain",
        "fit",
        "--config",
        str(tmp_path / "demo.yaml"),
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    assert fm3d_main(args) == 0

    client = MlflowClient(tracking_uri=local_tracking_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain/demo").experiment_id])
    source = json.loads((run_dir / "export" / "source.json").read_text())
    assert source["monitor"] == "val/clip/i2t_recall_at_5"  # demo.yaml's model.monitor

    def at_export(key: str) -> float:
        """The metric as last logged at or before the exported checkpoint's step."""
        history = [m for m in client.get_metric_history(run.info.run_id, key) if m.step <= source["step"]]
        return max(history, key=lambda m: m.step).value

    # Recompute image->report R@5 on the held-out studies from the exported folders.
    settings = config["data"]
    data = CTDataModule(**{**settings, "augment": False, "loader": LoaderSettings(**settings["loader"])})
    data.setup("validate")
    encoder = fm3d.load_encoder(run_dir / "export" / "encoder").eval()
    clip = load_clip(run_dir / "export" / "clip").eval()
    images, reports = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            keep = batch["has_report"]
            images.append(clip.encode_image(encoder(batch["image"]).pooled)[keep])
            reports.append(clip.encode_text([r for r, k in zip(batch["report"], keep, strict=True) if k]))
    images, reports = torch.cat(images), torch.cat(reports)
    held_out = images.shape[0]
    recall5 = recall_at_k(images @ reports.T, ks=(5,))[5]
    chance = 5 / held_out
    assert held_out >= 40  # 40% of the demo's patients
    assert recall5 == pytest.approx(at_export("val/clip/i2t_recall_at_5"), abs=1e-4)
    c_index = at_export("val/tte/c_index")
    figures = f"R@5 {recall5:.3f} (chance {chance:.3f}, {held_out} held out), C-index {c_index:.3f}, {source}"
    assert recall5 >= RECALL5_OVER_CHANCE * chance, figures
    assert c_index >= C_INDEX, figures
