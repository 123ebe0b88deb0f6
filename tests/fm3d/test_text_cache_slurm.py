"""slurm/text-cache.sbatch run for real on the local SLURM cluster: an array of shards fills one cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fm3d.text import TextTower, init_text_model
from fm3d.text_cache import TextEmbeddingCache

pytestmark = pytest.mark.slow

REPORTS = [f"Nodule of {size} mm in the {side} {lobe} lobe." for size in range(2, 9)
           for side in ("right", "left") for lobe in ("upper", "lower")]  # fmt: skip


def test_an_array_job_of_three_shards_equals_one_build(slurm, tmp_path: Path) -> None:
    pl.DataFrame({"study_id": [f"s{i}" for i in range(len(REPORTS))], "impression": REPORTS}).write_parquet(
        tmp_path / "reports.parquet"
    )
    model = init_text_model(tmp_path / "model", REPORTS, vocab_size=60, hidden_size=16, max_length=32)
    args = ["--model", str(model), "--reports", "reports.parquet", "--columns", "impression",
            "--out", "cache", "--pooling", "mean", "--max-length", "32"]  # fmt: skip
    job = slurm.submit("text-cache.sbatch", ["--array=0-2"], tmp_path, *args)
    for task in range(3):
        output = tmp_path / f"job-{job}.out"
        state = slurm.wait_finished(f"{job}_{task}", 300, output)
        assert state == "COMPLETED", [p.read_text() for p in tmp_path.glob("job-*.out")]
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert all(f"shard {task}/3" in logs for task in range(3))

    cache = TextEmbeddingCache(tmp_path / "cache")
    assert len(cache) == len(REPORTS) and len(list((tmp_path / "cache" / "parts").iterdir())) == 3
    tower = TextTower(str(model), pooling="mean", max_length=32)
    np.testing.assert_allclose(cache.vectors(REPORTS), tower.embed(REPORTS).numpy(), atol=1e-6)
