"""`fm3d text-model`: a tiny offline BERT learned from real report text, loaded back with transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from fm3d.data.tables import TableError
from fm3d.text import TextTower
from fm3d.text_cli import main, read_texts

FM3D = Path(sys.executable).with_name("fm3d")


@pytest.fixture(scope="module")
def ct_rate(shared_data: Path) -> Path:
    """1,211 real CT-RATE chest-CT reports (columns VolumeName, Findings_EN, Impressions_EN)."""
    return shared_data / "reports" / "ct_rate" / "validation_reports_subset.csv"


def test_command_builds_a_model_transformers_loads(ct_rate, tmp_path):
    out = tmp_path / "text_model"
    args = ["text-model", "--out", str(out), "--texts", str(ct_rate), "--columns", "Impressions_EN"]
    args += [
        "--vocab-size",
        "300",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--max-length",
        "64",
    ]
    result = subprocess.run([str(FM3D), *args], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "from 1211 texts" in result.stdout and str(out.resolve()) in result.stdout
    assert "\n\n" not in result.stdout  # no blank lines from the tokenizer trainer's progress
    model, tokenizer = AutoModel.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.max_position_embeddings == 64 and len(tokenizer) <= 300
    ids = tokenizer("No pleural effusion. Heart size is normal.")["input_ids"]
    assert tokenizer.unk_token_id not in ids  # the vocabulary was learned from these reports
    tower = TextTower(out, pooling="mean", max_length=64).eval()
    with torch.no_grad():
        assert tower(["No pleural effusion.", "Bilateral nodules."]).shape == (2, 32)


def test_read_texts_joins_the_columns_and_skips_empty_rows(tmp_path):
    table = tmp_path / "reports.parquet"
    pl.DataFrame(
        {
            "findings": ["Liver normal.", None, "  ", "Spleen  large."],
            "impression": ["Normal.", None, "", None],
        }
    ).write_parquet(table)
    assert read_texts(table, ["findings", "impression"]) == ["Liver normal.\nNormal.", "Spleen large."]


def test_missing_column_names_it_and_the_nearest(ct_rate, tmp_path, capsys):
    status = main(["--out", str(tmp_path / "m"), "--texts", str(ct_rate), "--columns", "Impression_EN"])
    assert status == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fm3d text-model: {ct_rate}: has no column 'Impression_EN'")
    assert "did you mean 'Impressions_EN'?" in line and "VolumeName" in line
    assert not (tmp_path / "m").exists()


def test_empty_texts_are_refused_naming_the_columns(tmp_path):
    table = tmp_path / "reports.csv"
    pl.DataFrame({"study_id": ["a", "b"], "findings": ["", ""]}).write_csv(table)
    with pytest.raises(TableError, match=r"columns findings hold no text in any of its 2 rows"):
        read_texts(table, ["findings"])


def test_missing_table_and_existing_output_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "reports.csv").write_text("findings\nLiver normal.\n")
    assert (
        main(["--out", str(tmp_path / "m"), "--texts", str(tmp_path / "report.csv"), "--columns", "x"]) == 2
    )
    line = capsys.readouterr().err.strip()
    assert "report.csv: does not exist. Did you mean" in line and line.endswith("reports.csv?")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    args = ["--out", str(tmp_path / "m"), "--texts", str(tmp_path / "reports.csv"), "--columns", "findings"]
    assert main(args) == 2
    assert "already exists. Pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--hidden-size", "30", "--heads", "4"]) == 2
    assert "--hidden-size 30 is not divisible by --heads 4" in capsys.readouterr().err
