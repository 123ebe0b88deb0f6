"""`fm3d pretrain`: run folders, shipped configs, best/last checkpoints, export of the best, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fm3d
from fm3d.cli import main as fm3d_main
from fm3d.clip import load_clip
from fm3d.data.cache import PreparedCache
from fm3d.train.runs import resolve_run_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fit_output(demo_cohort, run_config, tmp_path_factory) -> tuple[Path, str]:
    """A 6-step fit over 3 epochs of 2 batches (validation after each), and what it printed."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("cli")
    config = run_config(demo_cohort, tmp / "run.yaml", max_steps=6, limit_train_batches=2)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        status = fm3d_main(["pretrain", "fit", "--config", str(config), "--runs_root", str(tmp / "runs")])
    assert status == 0
    # Output to a file, as under SLURM: no carriage-return bar (Lightning's or Hugging Face's
    # weight-loading bars at the export) on either stream.
    assert "\r" not in printed.getvalue() and "\r" not in errors.getvalue(), errors.getvalue()[-2000:]
    return tmp / "runs" / "test", printed.getvalue()


@pytest.fixture(scope="module")
def finished_run(fit_output) -> Path:
    (run_dir,) = (p for p in fit_output[0].iterdir() if p.name != "latest")
    return run_dir


def test_fit_fills_the_run_folder(finished_run: Path) -> None:
    names = {p.name for p in finished_run.iterdir()}
    assert {"config.yaml", "checkpoints", "export", "plots", "metrics.json", "mlflow_run_id"} <= names
    # One MLflow store for the whole runs root, beside the name folders.
    assert not (finished_run / "mlflow.db").exists()
    assert (finished_run.parent.parent / "mlflow.db").is_file()
    assert (finished_run.parent / "latest").resolve() == finished_run.resolve()
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (finished_run / "plots" / "loss_curves.png").stat().st_size > 0
    assert (finished_run / "plots" / "retrieval_recall_at_k.png").stat().st_size > 0
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert {"val/clip/loss", "val/clip/i2t_recall_at_5", "train/loss"} <= set(metrics)


def test_fit_ends_with_a_summary(fit_output, finished_run: Path) -> None:
    printed = fit_output[1]
    summary = printed[printed.index("fm3d pretrain fit: done") :]
    run = finished_run.resolve()
    assert f"run folder   {run}" in summary and "latest" in summary
    assert f"best ckpt    {run / 'checkpoints' / 'best.ckpt'}  (val/clip/loss " in summary
    assert f"last ckpt    {run / 'checkpoints' / 'last.ckpt'}" in summary
    assert (
        f"exported     {run / 'export' / 'encoder'}, {run / 'export' / 'clip'}  (from best.ckpt: epoch"
        in summary
    )
    assert f"metrics      {run / 'metrics.json'}" in summary
    run_id = (finished_run / "mlflow_run_id").read_text()
    assert f"MLflow       sqlite:///{run.parent.parent / 'mlflow.db'}  run {run_id}" in summary


def test_the_best_checkpoint_is_exported(finished_run: Path) -> None:
    """The export comes from best.ckpt (lowest CLIP validation loss) and says so, not from the last step."""
    from mlflow import MlflowClient

    best = torch.load(finished_run / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    source = json.loads((finished_run / "export" / "source.json").read_text())
    assert source["step"] == best["global_step"] and source["epoch"] == best["epoch"]
    assert Path(source["checkpoint"]) == (finished_run / "checkpoints" / "best.ckpt").resolve()
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run.parent.parent / 'mlflow.db'}")
    history = client.get_metric_history((finished_run / "mlflow_run_id").read_text(), "val/clip/loss")
    assert len(history) == 3  # one validation per epoch
    # Epoch-end metrics are logged at the step before the checkpoint's global_step.
    at_best = max((m for m in history if m.step <= source["step"]), key=lambda m: m.step)
    assert source["score"] == pytest.approx(at_best.value) == min(m.value for m in history)
    encoder = fm3d.load_encoder(finished_run / "export" / "encoder")
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, best["state_dict"][f"encoder.{name}"], rtol=0, atol=0)


def test_exported_encoder_and_clip_match_the_best_checkpoint(finished_run: Path, demo_cohort) -> None:
    encoder = fm3d.load_encoder(finished_run / "export" / "encoder")
    checkpoint = torch.load(finished_run / "checkpoints" / "best.ckpt", weights_only=True)
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["state_dict"][f"encoder.{name}"], rtol=0, atol=0)
    from_ckpt = fm3d.load_encoder(finished_run / "checkpoints" / "best.ckpt")
    assert from_ckpt.config == encoder.config
    # The config states the input the weights were trained on: the data module's window, range and
    # the prepared cache's spacing, not the registry's defaults.
    (spacing,) = {tuple(s) for s in PreparedCache(demo_cohort["cache"]).index["spacing"].to_list()}
    assert encoder.config.hu_window == (-175.0, 250.0)
    assert encoder.config.intensity_range == (-1.0, 1.0)
    assert encoder.config.target_spacing_mm == spacing == (3.0, 2.0, 2.0)
    clip = load_clip(finished_run / "export" / "clip")
    torch.testing.assert_close(
        clip.logit_scale.detach(),
        checkpoint["state_dict"]["objectives.clip.clip.logit_scale"],
        rtol=0,
        atol=0,
    )
    text_key = next(k for k in checkpoint["state_dict"] if k.startswith("objectives.clip.clip.text."))
    torch.testing.assert_close(
        clip.state_dict()[text_key.removeprefix("objectives.clip.clip.")], checkpoint["state_dict"][text_key]
    )


def test_resolved_config_is_saved(finished_run: Path) -> None:
    import yaml

    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["trainer"]["default_root_dir"] == str(finished_run)
    assert saved["model"]["objectives"]["voco"]["class_path"].startswith("pretrain.objectives.")
    assert saved["model"]["objectives"]["voco"]["class_path"].endswith(".VoCoObjective")


def test_ckpt_path_last_resumes_the_newest_run(finished_run: Path, demo_cohort, run_config, tmp_path) -> None:
    runs_root = finished_run.parent.parent
    assert resolve_run_dir("test", runs_root, ckpt_path="last", environ={}) == finished_run
    config = run_config(demo_cohort, tmp_path / "more.yaml", max_steps=7, limit_train_batches=2)
    argv = ["pretrain", "fit", "--config", str(config), "--runs_root", str(runs_root), "--ckpt_path", "last"]
    assert fm3d_main(argv) == 0
    assert sorted(p.name for p in (runs_root / "test").iterdir()) == sorted(["latest", finished_run.name])
    # Step 7 stops in the middle of an epoch: last.ckpt is still written at the end of fit.
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 7


@pytest.mark.parametrize(
    "name", ["demo", "demo_all", "voco", "clip", "merlin", "full", "dino", "mae", "dino_clip_tte"]
)
@pytest.mark.parametrize("preset", ["cpu", "gpu", "multinode", "multinode+fsdp2"])
def test_shipped_configs_compose_and_print(name: str, preset: str, capsys) -> None:
    import yaml

    argv = [
        "pretrain",
        "fit",
        "--config",
        str(REPO / "conf" / "pretrain" / f"{name}.yaml"),
        *[
            arg
            for part in preset.split("+")
            for arg in ("--config", str(REPO / "conf" / "trainer" / f"{part}.yaml"))
        ],
        "--data.cache_dir",
        "somewhere",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        fm3d_main(argv)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["cache_dir"] == "somewhere"
    strategy = printed["trainer"]["strategy"]
    if preset.endswith("fsdp2"):
        assert strategy["class_path"] == "fm3d.train.fsdp.FSDP2Strategy"
        assert (
            strategy["init_args"]["mixed_precision"] == "bf16"
            and printed["trainer"]["precision"] == "32-true"
        )
    else:
        assert strategy == ("ddp" if preset != "cpu" else "auto")
    assert set(printed["model"]["objectives"]) <= {"voco", "clip", "phenotype", "tte", "dino", "mae"}


def test_the_plots_record_the_values_that_were_logged(finished_run: Path) -> None:
    """The plot history (kept in the checkpoint) holds each validation's logged value, not the one before."""
    from mlflow import MlflowClient

    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    (plots,) = (state for key, state in checkpoint["callbacks"].items() if key.startswith("TrainingPlots"))
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run.parent.parent / 'mlflow.db'}")
    run_id = (finished_run / "mlflow_run_id").read_text()
    for key in ("val/loss", "val/clip/i2t_recall_at_5"):
        logged = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        assert [value for _, value in plots["history"][key]] == pytest.approx(logged), key


def test_a_missing_checkpoint_is_one_line(demo_cohort, run_config, tmp_path: Path, capsys) -> None:
    config = run_config(demo_cohort, tmp_path / "run.yaml", max_steps=1)
    missing = tmp_path / "gone.ckpt"
    argv = ["pretrain", "fit", "--config", str(config), "--runs_root", str(tmp_path / "runs")]
    assert fm3d_main([*argv, "--ckpt_path", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fm3d pretrain: --ckpt_path {missing}: no such file; pass a checkpoint of an earlier run "
        "(e.g. runs/<name>/latest/checkpoints/last.ckpt) or 'last'"
    ]
