"""`fm3d text-cache build|info`: the reports the data module joins, embedded once; user errors exit 2."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fm3d.data.tables import ReportTable
from fm3d.text import TextTower, init_text_model
from fm3d.text_cache import TextEmbeddingCache
from fm3d.text_cache_cli import main

FINDINGS = ["Liver normal.", "Nodule in the right lobe.", "", "Pleural effusion on the left.", "No mass."]
IMPRESSIONS = ["Normal.", "Nodule.", "Effusion.", None, "Normal."]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports")
    table = pl.DataFrame(
        {"study_id": [f"s{i}" for i in range(5)], "findings": FINDINGS, "impression": IMPRESSIONS}
    )
    table.write_parquet(folder / "reports.parquet")
    init_text_model(folder / "model", [*FINDINGS, *map(str, IMPRESSIONS)] * 3, vocab_size=80, hidden_size=16,
                    max_length=32)  # fmt: skip
    return folder


def _build(reports, out, *extra: str) -> int:
    return main([
        "build", "--model", str(reports / "model"), "--reports", str(reports / "reports.parquet"),
        "--columns", "findings", "impression", "--out", str(out), "--pooling", "mean", "--max-length", "32",
        "--no-progress", *extra,
    ])  # fmt: skip


def test_build_embeds_the_reports_as_the_data_module_joins_them(reports, tmp_path, capsys):
    assert _build(reports, tmp_path / "cache") == 0
    printed = capsys.readouterr().out
    assert "embedded 5 and reused 0 cached of the 5 distinct report texts" in printed
    assert "reports/s" in printed

    joined = ReportTable.read(reports / "reports.parquet", ["findings", "impression"])
    texts = [joined.get(f"s{i}") for i in range(5)]
    assert texts[2] == "Effusion." and texts[3] == "Pleural effusion on the left."
    tower = TextTower(str(reports / "model"), pooling="mean", max_length=32)
    cache = TextEmbeddingCache(tmp_path / "cache")
    np.testing.assert_allclose(cache.vectors(texts), tower.embed(texts).numpy(), atol=1e-6)

    assert _build(reports, tmp_path / "cache") == 0  # a rerun embeds nothing
    assert "embedded 0 and reused 5 cached of the 5 distinct" in capsys.readouterr().out

    assert main(["info", str(tmp_path / "cache")]) == 0
    info = capsys.readouterr().out
    assert "5 report embeddings of width 16" in info and "pooling         'mean'" in info


def test_shards_through_the_cli_fill_one_folder(reports, tmp_path, capsys):
    for shard in ("0/2", "1/2"):
        assert _build(reports, tmp_path / "cache", "--shard", shard) == 0
    assert "(shard 1/2)" in capsys.readouterr().out
    assert len(TextEmbeddingCache(tmp_path / "cache")) == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--columns", "finding"], "lacks the columns ['finding']"),
        (["--reports", "missing.parquet"], "missing.parquet: does not exist"),
        (["--model", "no/such-model"], "the text model 'no/such-model' is not on this machine"),
        (["--pooling", "cls"], "pooling: cache 'mean', this run 'cls'"),
    ],
)
def test_user_errors_exit_2_with_one_line(reports, tmp_path, capsys, change, message):
    assert _build(reports, tmp_path / "cache") == 0
    argv = ["build", "--model", str(reports / "model"), "--reports", str(reports / "reports.parquet"),
            "--columns", "findings", "--out", str(tmp_path / "cache"), "--pooling", "mean",
            "--max-length", "32", "--no-progress"]  # fmt: skip
    for option, value in zip(change[::2], change[1::2], strict=True):
        argv[argv.index(option) + 1] = value
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fm3d text-cache: ") and message in err and err.count("\n") == 1


def test_bad_shard_and_not_a_cache(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["build", "--model", "m", "--reports", "r", "--columns", "c", "--out", "o", "--shard", "2/2"])
    assert exited.value.code == 2 and "shard 2/2 does not exist" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "is not a report-embedding cache" in capsys.readouterr().err
