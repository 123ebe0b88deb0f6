"""PreparedCache reads a cache written by hand in the documented schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fm3d.data.cache import PreparedCache
from fm3d.data.errors import CacheError
from fm3d.data.io import read_volume
from fm3d.data.prepare import prepare_cache
from fm3d.data.preprocess import preprocess
from fm3d.spec import InputSpec


def _write_cache(root: Path) -> dict[str, np.ndarray]:
    """Two usable studies (one with a label) and one failed row, following the documented layout."""
    rng = np.random.default_rng(0)
    (root / "studies").mkdir(parents=True)
    (root / "labels").mkdir()
    arrays = {
        "a": rng.integers(-1000, 1000, size=(4, 5, 6), dtype=np.int16),
        "b": rng.integers(-1000, 1000, size=(3, 7, 2), dtype=np.int16),
    }
    label_a = (arrays["a"] > 0).astype(np.uint8)
    for sid, arr in arrays.items():
        np.save(root / "studies" / f"{sid}.npy", arr)
    np.save(root / "labels" / "a.npy", label_a)
    affine_a = np.array([[0, 0, 1.5, -10], [0, 1.5, 0, -20], [3.0, 0, 0, -30], [0, 0, 0, 1]], dtype=float)
    rows = [
        dict(
            study_id="a",
            patient_id="p1",
            status="ok",
            image_file="studies/a.npy",
            label_file="labels/a.npy",
            shape=[4, 5, 6],
            spacing=[3.0, 1.5, 1.5],
            affine=affine_a.ravel().tolist(),
            hu_p1=-990.0,
            hu_p50=0.0,
            hu_p99=990.0,
            source_path="/x/a.nii.gz",
            source_hash="h1",
            settings="{}",
            record=json.dumps({"original_shape": [6, 5, 4]}),
            report="liver lesion",
        ),
        dict(
            study_id="b",
            patient_id="p2",
            status="ok",
            image_file="studies/b.npy",
            label_file=None,
            shape=[3, 7, 2],
            spacing=[1.5, 1.5, 1.5],
            affine=np.eye(4).ravel().tolist(),
            hu_p1=-990.0,
            hu_p50=0.0,
            hu_p99=990.0,
            source_path="/x/b.nii.gz",
            source_hash="h2",
            settings="{}",
            record="{}",
            report=None,
        ),
        dict(
            study_id="c",
            patient_id="p3",
            status="failed",
            image_file=None,
            label_file=None,
            shape=None,
            spacing=None,
            affine=None,
            hu_p1=None,
            hu_p50=None,
            hu_p99=None,
            source_path="/x/c.nii.gz",
            source_hash="h3",
            settings="{}",
            record=None,
            report="normal",
        ),
    ]
    pl.DataFrame(rows).write_parquet(root / "index.parquet")
    return {"a": arrays["a"], "b": arrays["b"], "label_a": label_a, "affine_a": affine_a}


def test_reads_hand_written_cache(tmp_path: Path) -> None:
    expected = _write_cache(tmp_path)
    cache = PreparedCache(tmp_path)

    assert len(cache) == 2
    assert cache.study_ids == ["a", "b"]
    assert cache.index.height == 2 and "report" in cache.index.columns
    assert "c" not in cache and "a" in cache

    image = cache.image("a")
    assert isinstance(image, np.memmap)  # a map of the file, never a copy
    assert image.dtype == np.int16 and image.shape == (4, 5, 6)
    np.testing.assert_array_equal(image, expected["a"])
    np.testing.assert_array_equal(cache.label("a"), expected["label_a"])
    assert cache.label("b") is None
    assert cache.spacing("a") == (3.0, 1.5, 1.5)
    assert cache.shape("b") == (3, 7, 2)
    np.testing.assert_array_equal(cache.affine("a"), expected["affine_a"])
    assert cache.record("a") == {"original_shape": [6, 5, 4]}
    assert cache.row("a")["report"] == "liver lesion"
    assert cache.row("b")["patient_id"] == "p2"


def test_unknown_study_names_the_cache(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    cache = PreparedCache(tmp_path)
    with pytest.raises(KeyError, match="'c' is not a prepared study"):
        cache.image("c")


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"no index.parquet in it, so it is not a prepared cache"):
        PreparedCache(tmp_path)


def test_index_without_schema(tmp_path: Path) -> None:
    pl.DataFrame({"study_id": ["a"]}).write_parquet(tmp_path / "index.parquet")
    with pytest.raises(CacheError, match=r"lacks the index columns \['patient_id'"):
        PreparedCache(tmp_path)


def test_missing_study_file(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    (tmp_path / "studies" / "b.npy").unlink()
    cache = PreparedCache(tmp_path)
    with pytest.raises(CacheError, match=r"b\.npy: is listed in the index but missing"):
        cache.image("b")


def test_reads_a_cache_written_by_fm3d_prepare(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
    pl.DataFrame({"study_id": ["x"], "patient_id": ["p"], "image_path": [str(source)]}).write_csv(
        tmp_path / "m.csv"
    )
    spec = InputSpec((1.5, 1.5, 1.5))
    prepare_cache(tmp_path / "m.csv", tmp_path / "cache", spec=spec, progress=False)
    cache = PreparedCache(tmp_path / "cache")
    expected = preprocess(read_volume(source), spec)
    assert cache.study_ids == ["x"] and len(cache) == 1
    np.testing.assert_array_equal(cache.image("x"), expected.image)
    assert cache.shape("x") == expected.image.shape == (60, 202, 244)
    assert cache.spacing("x") == pytest.approx((1.5, 1.5, 1.5))
    np.testing.assert_allclose(cache.affine("x"), expected.affine)
    assert cache.record("x") == expected.record.to_dict()
    assert cache.label("x") is None
