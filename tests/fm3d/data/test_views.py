"""The views registry: built-ins, a view registered here reaching the batch through workers, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fm3d.data.base import LoaderSettings
from fm3d.data.datamodule import CTDataModule
from fm3d.data.prepare import prepare_cache
from fm3d.data.views import View, ViewContext, ViewError, build_views, register_view, view_names, view_serving
from fm3d.spec import InputSpec

from .conftest import write_nifti_cohort


@register_view("test_slab_mean")
class SlabMeanView(View):
    """A view the library knows nothing about: the mean HU of a random slab, and the slab's start."""

    keys = ("slab_mean", "slab_start")

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"slab_mean": (1,)}

    def fill(self, volume, rng: np.random.Generator, context: ViewContext, out) -> dict:
        start = int(rng.integers(0, volume.shape[0] - self.depth + 1))
        mean = torch.tensor([float(np.asarray(volume[start : start + self.depth]).mean())])
        if "slab_mean" in out:
            out["slab_mean"].copy_(mean)
            mean = out["slab_mean"]
        return {"slab_mean": mean, "slab_start": torch.tensor(start)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("views")
    manifest = write_nifti_cohort(root / "nifti", studies=6)
    prepare_cache(manifest, root / "cache", spec=InputSpec((1.5, 1.5, 1.5)), progress=False)
    return root / "cache"


def test_builtins_are_registered_and_declare_their_keys():
    assert {"image", "voco", "test_slab_mean"} <= set(view_names())
    assert view_serving("voco_labels") == "voco" and view_serving("image") == "image"
    assert view_serving("slab_start") == "test_slab_mean" and view_serving("phenotype") is None


def test_a_registered_view_reaches_the_batch_through_workers(cache: Path):
    views = {"image": {"size": [8, 16, 16]}, "test_slab_mean": {"depth": 3}}
    loader = LoaderSettings(
        batch_size=2, num_workers=2, split_fractions=(1.0, 0.0, 0.0), persistent_workers=False
    )
    data = CTDataModule(cache, views=views, loader=loader, augment=False)
    data.setup("fit")
    assert "slab_mean" in data.batch_keys and "slab_start" in data.batch_keys
    batches = list(data.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (2, 1, 8, 16, 16)
        assert batch["slab_mean"].shape == (2, 1) and batch["slab_start"].shape == (2,)
        for row, study_id in enumerate(batch["study_id"]):
            volume = np.asarray(data.cache.image(study_id))
            start = int(batch["slab_start"][row])
            assert float(batch["slab_mean"][row, 0]) == pytest.approx(
                volume[start : start + 3].mean(), rel=1e-6
            )
    # The worker draws are the in-process draws: the same (seed, epoch, position) stream.
    in_process = CTDataModule(cache, views=views, loader=LoaderSettings(**{**vars(loader), "num_workers": 0}),
                              augment=False)  # fmt: skip
    in_process.setup("fit")
    for a, b in zip(batches, in_process.train_dataloader(), strict=True):
        assert a["study_id"] == b["study_id"] and torch.equal(a["slab_start"], b["slab_start"])


def test_view_errors_name_the_setting():
    with pytest.raises(ViewError, match=r"no view is registered as 'edges'.*known: \[.*'image'"):
        build_views({"edges": {}})
    with pytest.raises(ViewError, match=r"data\.views\.image: .*unexpected keyword argument 'sise'"):
        build_views({"image": {"sise": [8, 8, 8]}})
    with pytest.raises(ViewError, match=r"data\.views\.image\.size must be three positive voxel counts"):
        build_views({"image": {"size": [8, 8]}})
    with pytest.raises(ViewError, match="registered twice"):
        register_view("image")(SlabMeanView)


def test_a_dotted_view_name_imports_its_module():
    (view,) = build_views({"tests.fm3d.data.test_views.test_slab_mean": {"depth": 2}})
    assert isinstance(view, SlabMeanView) and view.depth == 2
