"""`fm3d pretrain`: run folders, shipped configs, export at the end of fit, `--ckpt_path last`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fm3d
from fm3d.cli import main as fm3d_main
from fm3d.clip import load_clip
from fm3d.data.cache import PreparedCache
from pretrain.cli import PretrainConfigError, resolve_run_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(demo_cohort, run_config, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    config = run_config(demo_cohort, tmp / "run.yaml", max_steps=3, limit_train_batches=3)
    status = fm3d_main(["pretrain", "fit", "--config", str(config), "--runs_root", str(tmp / "runs")])
    assert status == 0
    (run_dir,) = (tmp / "runs" / "test").iterdir()
    return run_dir


def test_fit_fills_the_run_folder(finished_run: Path) -> None:
    names = {p.name for p in finished_run.iterdir()}
    assert {"config.yaml", "checkpoints", "export", "plots", "mlflow.db", "mlartifacts"} <= names
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (finished_run / "plots" / "loss_curves.png").stat().st_size > 0
    assert (finished_run / "plots" / "retrieval_recall_at_k.png").stat().st_size > 0


def test_exported_encoder_and_clip_match_the_last_checkpoint(finished_run: Path, demo_cohort) -> None:
    encoder = fm3d.load_encoder(finished_run / "export" / "encoder")
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["state_dict"][f"encoder.{name}"], rtol=0, atol=0)
    from_ckpt = fm3d.load_encoder(finished_run / "checkpoints" / "last.ckpt")
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
    config = run_config(demo_cohort, tmp_path / "more.yaml", max_steps=4, limit_train_batches=3)
    argv = ["pretrain", "fit", "--config", str(config), "--runs_root", str(runs_root), "--ckpt_path", "last"]
    assert fm3d_main(argv) == 0
    assert [p for p in (runs_root / "test").iterdir()] == [finished_run]  # no new folder
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4


def test_run_dir_rules(tmp_path: Path) -> None:
    assert resolve_run_dir("a", tmp_path, default_root_dir=tmp_path / "x", environ={}) == tmp_path / "x"
    assert resolve_run_dir("a", tmp_path, environ={"FM3D_RUN_DIR": "/r"}) == Path("/r")
    assert resolve_run_dir("a", tmp_path, environ={"SLURM_JOB_ID": "42"}) == tmp_path / "a" / "slurm-42"
    assert resolve_run_dir("a", tmp_path, environ={"TORCHELASTIC_RUN_ID": "job7"}) == tmp_path / "a" / "job7"
    stamped = resolve_run_dir("a", tmp_path, environ={"TORCHELASTIC_RUN_ID": "none"})
    assert stamped.parent == tmp_path / "a" and stamped.name[:2] == "20"
    with pytest.raises(PretrainConfigError, match="no earlier run of 'a'"):
        resolve_run_dir("a", tmp_path, ckpt_path="last", environ={})


@pytest.mark.parametrize("name", ["demo", "voco", "clip", "merlin", "full"])
@pytest.mark.parametrize("preset", ["cpu", "gpu", "multinode"])
def test_shipped_configs_compose_and_print(name: str, preset: str, capsys) -> None:
    import yaml

    argv = [
        "pretrain",
        "fit",
        "--config",
        str(REPO / "conf" / "pretrain" / f"{name}.yaml"),
        "--config",
        str(REPO / "conf" / "trainer" / f"{preset}.yaml"),
        "--data.cache_dir",
        "somewhere",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        fm3d_main(argv)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["cache_dir"] == "somewhere"
    assert printed["trainer"]["strategy"] == ("ddp" if preset != "cpu" else "auto")
    assert set(printed["model"]["objectives"]) <= {"voco", "clip", "phenotype", "tte"}
