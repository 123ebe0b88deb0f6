"""`fm3d eval-encoders` end to end: the table, the files, MLflow, reuse on a rerun, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow import MlflowClient

from fm3d.cli import main as fm3d_main
from fm3d.train.tracking import local_tracking_uri


def suite_yaml(cohort: Path, folder: Path, **protocols: dict) -> Path:
    """A two-protocol suite on the evaluation cohort (200 resamples to keep the test quick)."""
    labels = str(cohort / "findings.parquet")
    config = {
        "name": "tiny",
        "seed": 0,
        "data": {"cache_dir": str(cohort / "cache"), "split_fractions": [0.5, 0.2, 0.3], "split_seed": 0},
        "features_dir": str(folder / "kept"),
        "bootstrap": {"resamples": 200},
        "protocols": protocols
        or {"linear_probe": {"labels": labels, "epochs": 50}, "knn": {"labels": labels, "k": 3}},
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_encoders_give_one_table_with_paired_intervals_logged_and_kept(
    eval_cohort: Path, tiny_encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = suite_yaml(eval_cohort, tmp_path)
    encoders = ["--encoders", f"random=random:{tiny_encoder_dir}", f"tiny={tiny_encoder_dir}"]
    args = ["eval-encoders", "--config", str(config), "--runs-root", str(tmp_path / "runs"), *encoders]
    assert fm3d_main(args) == 0
    run = (tmp_path / "runs" / "eval" / "tiny" / "latest").resolve()
    for name in ("results.md", "results.csv", "intervals.png", "suite.json"):
        assert (run / name).is_file(), name
    table = pl.read_csv(run / "results.csv")
    macro = table.filter(pl.col("metric") == "auroc_macro")
    assert sorted(macro["protocol"].unique()) == ["knn", "linear_probe"]
    reference = macro.filter(pl.col("encoder") == "random")
    other = macro.filter(pl.col("encoder") == "tiny")
    assert reference["verdict"].to_list() == ["reference"] * 2
    for row in other.iter_rows(named=True):  # the difference is the two values' difference
        ref = reference.filter(pl.col("protocol") == row["protocol"]).row(0, named=True)
        assert row["diff"] == pytest.approx(row["value"] - ref["value"])
        assert row["diff_low"] <= row["diff"] <= row["diff_high"]
        assert row["verdict"] in {"higher", "lower", "no difference"}
        assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["resamples"] > 100
    markdown = (run / "results.md").read_text()
    assert "| protocol | metric | random | tiny | Δ tiny − random |" in markdown
    assert "random initialisation (seed 0)" in markdown and "read as prepared (no resampling)" in markdown
    described = json.loads((run / "suite.json").read_text())
    runs = {f"{protocol}/{encoder}" for protocol in ("linear_probe", "knn") for encoder in ("random", "tiny")}
    assert set(described["selected"]) == runs
    assert described["bootstrap"] == {"resamples": 200, "confidence": 0.95, "unit": "patient", "seed": 0}
    first = described["timings_s"]
    assert first["features_s"] > 0 and first["protocols_s"] > 0
    assert "| linear_probe | auroc_macro |" in capsys.readouterr().out

    # MLflow: the figures and the files, in the local store under the runs root.
    client = MlflowClient(tracking_uri=local_tracking_uri(tmp_path / "runs"))
    (logged,) = client.search_runs([client.get_experiment_by_name("eval/tiny").experiment_id])
    row = other.filter(pl.col("protocol") == "linear_probe").row(0, named=True)
    assert logged.data.metrics["linear_probe/auroc_macro/tiny"] == pytest.approx(row["value"])
    assert logged.data.metrics["linear_probe/auroc_macro/tiny/diff"] == pytest.approx(row["diff"])
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} >= {"results.md", "results.csv"}

    # A rerun reads features and figures back: nothing is extracted or fitted, the table is the same.
    again = tmp_path / "again"
    assert fm3d_main([*args[:-3], "--out", str(again), *encoders]) == 0
    rerun = json.loads((again / "suite.json").read_text())["timings_s"]
    assert rerun["features_s"] == rerun["protocols_s"] == rerun["bootstrap_s"] == 0.0
    assert pl.read_csv(again / "results.csv").equals(table)
    # --recompute fits again and gets the same figures (seeded).
    fresh = tmp_path / "fresh"
    assert fm3d_main([*args[:-3], "--out", str(fresh), "--recompute", *encoders]) == 0
    assert json.loads((fresh / "suite.json").read_text())["timings_s"]["protocols_s"] > 0
    assert pl.read_csv(fresh / "results.csv").equals(table)


def test_user_errors_are_one_line_with_the_fix(
    eval_cohort: Path, tiny_encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = suite_yaml(eval_cohort, tmp_path)
    base = ["eval-encoders", "--config", str(config), "--runs-root", str(tmp_path / "runs")]
    assert fm3d_main([*base, "--encoders", "no/such/folder"]) == 2
    assert "does not exist and is not a registry encoder" in capsys.readouterr().err
    assert fm3d_main([*base, "--protocols", "linear_prob", "--encoders", str(tiny_encoder_dir)]) == 2
    assert "not in the suite config" in capsys.readouterr().err
    broken = yaml.safe_load(config.read_text())
    broken["bootstrap"]["resample"] = 10
    config.write_text(yaml.safe_dump(broken))
    assert fm3d_main([*base, "--encoders", str(tiny_encoder_dir)]) == 2
    assert "unknown key(s) ['bootstrap.resample']" in capsys.readouterr().err
    unknown = suite_yaml(eval_cohort, tmp_path, linear_probe={"labels": "x.parquet", "epoch": 3})
    assert fm3d_main(["eval-encoders", "--config", str(unknown), "--encoders", str(tiny_encoder_dir)]) == 2
    assert "protocols.linear_probe" in capsys.readouterr().err
