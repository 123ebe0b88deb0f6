"""The input spec through preparation and sampling: recorded by `fm3d prepare`, read back, checked."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from fm3d.data.base import LoaderSettings
from fm3d.data.cache import INDEX_FILE, PreparedCache
from fm3d.data.datamodule import CTDataModule
from fm3d.data.errors import CacheError
from fm3d.spec import InputSpec, InputSpecError

from .conftest import write_nifti_cohort


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache written by the real `fm3d prepare` command at 2 mm, clipped to -500..500 HU."""
    from .conftest import _run_prepare

    root = tmp_path_factory.mktemp("spec")
    manifest = write_nifti_cohort(root / "nifti", studies=3)
    run = _run_prepare("--manifest", manifest, "--out", root / "cache", "--spacing", "2", "2", "2",
                       "--hu-window", "-500", "500")  # fmt: skip
    assert run.returncode == 0, run.stderr
    return root / "cache"


def _data(cache: Path, **settings) -> CTDataModule:
    return CTDataModule(cache, loader=LoaderSettings(split_fractions=(1.0, 0.0, 0.0)), **settings)


def test_the_cache_reads_back_the_spec_it_was_prepared_with(cache: Path):
    assert PreparedCache(cache).input_spec == InputSpec((2.0, 2.0, 2.0), (-500.0, 500.0))
    # The recorded settings keep the keys caches were always written with (old caches stay readable).
    recorded = json.loads(pl.read_parquet(cache / INDEX_FILE)["settings"][0])
    assert recorded == {
        "hu_window": [-500.0, 500.0],
        "series_uid": None,
        "target_spacing_mm": [2.0, 2.0, 2.0],
    }


def test_the_data_module_spec_is_the_cache_spacing_with_its_own_window_and_view(cache: Path):
    data = _data(cache, views={"image": {"size": [8, 8, 8]}}, hu_window=(-175, 250), intensity_range=(-1, 1))
    data.setup("fit")
    assert data.input_spec == InputSpec((2.0, 2.0, 2.0), (-175.0, 250.0), (-1.0, 1.0), "zyx", (8, 8, 8))
    voco_only = _data(cache, views={"voco": {"geometry": "tiny"}}, hu_window=(-500, 500))
    assert voco_only.input_spec.image_size == (32, 32, 32)  # the VoCo crop's, without a global view


def test_a_wider_window_than_the_cache_was_clipped_to_is_refused(cache: Path):
    data = _data(cache, views={"image": {"size": [8, 8, 8]}})  # the default -1000..1000 HU
    with pytest.raises(InputSpecError, match=r"prepared cache .*cache was clipped to \[-500.0, 500.0\] HU.*"
                       r"--hu-window -1000 1000 or narrow hu_window"):  # fmt: skip
        data.setup("fit")


def test_studies_prepared_with_different_settings_are_refused(cache: Path, tmp_path: Path):
    index = pl.read_parquet(cache / INDEX_FILE)
    other = json.dumps(
        {"hu_window": [-1000.0, 1000.0], "series_uid": None, "target_spacing_mm": [2.0, 2.0, 2.0]}
    )
    index = index.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(other)).otherwise("settings")
                               .alias("settings"))  # fmt: skip
    index.write_parquet(tmp_path / INDEX_FILE)
    with pytest.raises(CacheError, match="prepared with different settings"):
        _ = PreparedCache(tmp_path).input_spec
