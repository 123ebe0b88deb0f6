"""MLflow tracking of `fm3d pretrain fit`, read back from the real store with MlflowClient."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fm3d.cli import main as fm3d_main
from fm3d.train.tracking import RUN_ID_FILE, local_tracking_uri


@pytest.fixture(scope="module")
def tracked(demo_cohort, run_config, tmp_path_factory) -> tuple[Path, list[str]]:
    """A fit's run folder and every warning it raised."""
    tmp = tmp_path_factory.mktemp("tracking")
    config = run_config(
        demo_cohort, tmp / "run.yaml", objectives=("clip", "phenotype"), max_steps=2, limit_train_batches=2
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fm3d_main(["pretrain", "fit", "--config", str(config), "--runs_root", str(tmp / "runs")]) == 0
    (run_dir,) = (p for p in (tmp / "runs" / "test").iterdir() if p.name != "latest")
    return run_dir, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def tracked_run(tracked) -> Path:
    return tracked[0]


def test_metric_names_are_logged_as_they_are(tracked) -> None:
    """MLflow takes every metric name as logged: no `@` renamed away, no counts among the metrics."""
    run_dir, caught = tracked
    assert not [m for m in caught if "replaced" in m or "Discouraged" in m or "metric name" in m.lower()]
    client = MlflowClient(tracking_uri=local_tracking_uri(run_dir.parent.parent))
    metrics = client.get_run(run_dir.joinpath(RUN_ID_FILE).read_text()).data.metrics
    assert {"val/clip/i2t_recall_at_1", "val/clip/i2t_recall_at_5", "val/clip/t2i_recall_at_10"} <= set(
        metrics
    )
    assert not [key for key in metrics if "@" in key or key.endswith(("_phenotypes", "_tasks", "_size"))]


def _only_run(client: MlflowClient, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_the_local_store_holds_config_metrics_plots_and_export(tracked_run: Path) -> None:
    runs_root = tracked_run.parent.parent
    client = MlflowClient(tracking_uri=local_tracking_uri(runs_root))  # the store of the runs root
    run = _only_run(client, "pretrain/test")
    assert (tracked_run / RUN_ID_FILE).read_text() == run.info.run_id
    assert run.data.params["model.encoder"] == "vit3d_tiny"
    assert run.data.params["data.loader.batch_size"] == "4"
    # The total is the weighted sum of the objective losses at every logged step (weights 1).
    total = client.get_metric_history(run.info.run_id, "train/loss")
    parts = [client.get_metric_history(run.info.run_id, f"train/{n}/loss") for n in ("clip", "phenotype")]
    assert [m.step for m in total] == [0, 1]
    for step, metric in enumerate(total):
        assert metric.value == pytest.approx(sum(p[step].value for p in parts), rel=1e-5)
    assert {m.key for m in client.get_metric_history(run.info.run_id, "val/clip/i2t_recall_at_5")} == {
        "val/clip/i2t_recall_at_5"
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "export", "metrics.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_curves.png", "plots/retrieval_recall_at_k.png"}
    encoder = {a.path for a in client.list_artifacts(run.info.run_id, "export/encoder")}
    assert encoder == {"export/encoder/config.json", "export/encoder/model.safetensors"}
    assert "export/source.json" in {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert "export/clip" in {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    # Artifacts live beside the store, per experiment, not in ./mlruns.
    artifacts_root = (runs_root / "mlartifacts" / "pretrain" / "test").resolve()
    assert run.info.artifact_uri.startswith(artifacts_root.as_uri())


def test_tracking_uri_sends_the_run_elsewhere(demo_cohort, run_config, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the stand-in server's default artifact root is ./mlruns
    server = f"sqlite:///{tmp_path / 'server.db'}"
    config = run_config(demo_cohort, tmp_path / "run.yaml", objectives=("phenotype",), max_steps=1)
    argv = [
        "pretrain",
        "fit",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--tracking_uri",
        server,
        "--name",
        "elsewhere",
    ]
    assert fm3d_main(argv) == 0
    assert not (tmp_path / "run" / "mlflow.db").exists()
    run = _only_run(MlflowClient(tracking_uri=server), "pretrain/elsewhere")
    assert run.data.metrics["train/loss"] > 0
