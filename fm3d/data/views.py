"""Views: what a training sample cuts from a study's volume, declared by name and batch keys.

A view is a class registered with `@register_view(name)`. It states the batch keys it writes
(`keys`) and the per-sample shapes of its float tensors (`shapes()`, which the dataset
allocates once per batch, in shared memory inside a worker), and fills them from a prepared
volume and the sample's random generator (`fill`). The data module serves the views its config
names (`data.init_args.views: {name: settings}`, in the order given, which is the order their
random draws are made) without knowing what they mean; an objective declares the keys it needs
(`Objective.batch_keys`) and the pretraining module checks them against what the data serves.

Built-ins: "image", the global view (`GlobalView`), and "voco", VoCo's base and random crops
(`VoCoView`), here; "multicrop" (DINO's global and local crops with iBOT masks,
`fm3d.data.multicrop`) and "mae" (one masked region, `fm3d.data.masked_view`) in their own
modules, imported the first time the registry is asked about a name (so TorchIO loads only for
runs that use them). A view outside fm3d registers itself when its module is imported; naming
it in a config by its dotted path (`mypkg.views.edges`) imports `mypkg.views` and uses its view
"edges".
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fm3d.data.augment import AugmentConfig, AugmentParams, apply_intensity, spatial_view
from fm3d.data.crops import VoCoGeometry, voco_geometry
from fm3d.data.regions import read_region, region_start, scale_window
from fm3d.errors import Fm3dError

Size3 = tuple[int, int, int]


class ViewError(Fm3dError, ValueError):
    """A view name no module registered, or view settings that do not fit it."""


@dataclass(frozen=True)
class ViewContext:
    """What every view of one sample shares: the HU window, the intensity range, augmentation.

    augment is None in evaluation; `train` says whether region corners are drawn at random.
    spacing_mm: the cache's voxel spacing (D, H, W), for views whose extents are physical.
    """

    hu_window: tuple[int, int]
    intensity_range: tuple[float, float]
    augment: AugmentConfig | None
    train: bool
    spacing_mm: tuple[float, float, float]


class View:
    """Base of the views: see the module docstring.

    keys: every batch key the view writes. `shapes()` lists the per-sample float32 tensors
    among them; `fill` writes those into `out` (when given: slots of the batch tensors) and
    returns every key's value.
    """

    name: ClassVar[str] = "view"
    keys: ClassVar[tuple[str, ...]] = ()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def fill(
        self,
        volume: np.ndarray,
        rng: np.random.Generator,
        context: ViewContext,
        out: Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def image_size(self) -> Size3 | None:
        """(D, H, W) of the encoder input this view makes (the input spec's image size), None if none."""
        return None


_VIEWS: dict[str, type[View]] = {}
# fm3d's views that live in modules of their own; they register themselves when imported.
_BUILTIN_MODULES = ("fm3d.data.multicrop", "fm3d.data.masked_view")


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def register_view(name: str):
    """Class decorator: make a `View` subclass available to configs under `name`."""

    def register(cls: type[View]) -> type[View]:
        if name in _VIEWS and _VIEWS[name] is not cls:
            raise ViewError(
                f"view {name!r} is registered twice ({_VIEWS[name].__qualname__}, {cls.__qualname__})"
            )
        cls.name = name
        _VIEWS[name] = cls
        return cls

    return register


def view_names() -> list[str]:
    """Names of the registered views."""
    _import_builtins()
    return sorted(_VIEWS)


def view_class(name: str) -> type[View]:
    """The view class registered as `name`, importing the module of a dotted name first."""
    if name not in _VIEWS:
        _import_builtins()
    if name not in _VIEWS and "." in name:
        module, name = name.rsplit(".", 1)
        importlib.import_module(module)
    if name not in _VIEWS:
        raise ViewError(
            f"no view is registered as {name!r} (known: {view_names()}); name a built-in view or "
            "the dotted path of one registered with fm3d.data.views.register_view"
        )
    return _VIEWS[name]


def build_views(settings: Mapping[str, Mapping[str, Any] | None]) -> tuple[View, ...]:
    """Views from a config mapping {name: settings}, in its order."""
    views = []
    for name, kwargs in settings.items():
        cls = view_class(name)
        try:
            views.append(cls(**dict(kwargs or {})))
        except TypeError as exc:
            raise ViewError(f"data.views.{name}: {exc}") from None
    keys = [key for view in views for key in view.keys]
    clashes = sorted({key for key in keys if keys.count(key) > 1})
    if clashes:
        raise ViewError(f"data.views: two views write the batch keys {clashes}; keep one of them")
    return tuple(views)


def view_serving(key: str) -> str | None:
    """The registered view that writes batch key `key`, if one does."""
    _import_builtins()
    return next((name for name, cls in sorted(_VIEWS.items()) if key in cls.keys), None)


@register_view("image")
class GlobalView(View):
    """The global view `image` [1, D, H, W] for CLIP and EHR heads: one region, resized when it differs.

    size: (D, H, W) of the view. region: voxels read before resizing to `size` (None: = size).
    Intensity augmentation only: flipping it would contradict laterality in its report.
    """

    keys = ("image",)

    def __init__(self, size: Size3, region: Size3 | None = None) -> None:
        self.size = _size3(size, "data.views.image.size")
        self.region = self.size if region is None else _size3(region, "data.views.image.region")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"image": (1, *self.size)}

    @property
    def image_size(self) -> Size3:
        return self.size

    def fill(self, volume, rng, context: ViewContext, out) -> dict[str, Any]:
        start = region_start(volume.shape, self.region, rng if context.train else None)
        shifted = torch.from_numpy(read_region(volume, start, self.region, context.hu_window))
        into = out.get("image")
        if self.region == self.size:
            x = scale_window(
                shifted, context.hu_window, context.intensity_range, None if into is None else into[0]
            )
            x = x[None]
        else:
            scaled = scale_window(shifted, context.hu_window, context.intensity_range)[None, None]
            x = _resized(scaled, self.size, None if into is None else into[None])[0]
        if context.augment is not None:
            apply_intensity(x[None], AugmentParams.draw(1, rng, context.augment, spatial=False))
        return {"image": x}  # [1, D, H, W]


@register_view("voco")
class VoCoView(View):
    """VoCo's crops: `voco_bases` [K, 1, d, h, w], `voco_crops` [R, 1, d, h, w], `voco_labels` [R, K].

    geometry: a preset name of `fm3d.data.crops` ("v1", "v2", "tiny") or a `VoCoGeometry`.
    """

    keys = ("voco_bases", "voco_crops", "voco_labels")

    def __init__(self, geometry: str | VoCoGeometry = "v2") -> None:
        self.geometry = voco_geometry(geometry)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        g = self.geometry
        return {
            "voco_bases": (g.num_bases, 1, *g.crop_shape),
            "voco_crops": (g.num_random_crops, 1, *g.crop_shape),
        }

    @property
    def image_size(self) -> Size3:
        return self.geometry.crop_shape

    def fill(self, volume, rng, context: ViewContext, out) -> dict[str, Any]:
        g, window, augment = self.geometry, context.hu_window, context.augment
        start = region_start(volume.shape, g.region_size, rng if context.train else None)
        region = torch.from_numpy(read_region(volume, start, g.region_size, window))  # [D, n*b, n*b]
        b, depth = g.base_size, g.region_size[0]
        resize = g.output_size != b
        bases, crops = out.get("voco_bases"), out.get("voco_crops")
        # Without a resize the crops are written straight into the given (batch) tensors.
        base_out = bases if bases is not None and not resize else torch.empty((g.num_bases, 1, depth, b, b))
        crop_out = (
            crops if crops is not None and not resize else torch.empty((g.num_random_crops, 1, depth, b, b))
        )
        # Each crop goes from the integer region (turned/flipped there, where it is cheap)
        # straight into its float slot; bases in VoCo's x-major order k = i * n + j.
        base_params = None if augment is None else AugmentParams.draw(g.num_bases, rng, augment)
        centres = g.draw_random_centres(rng)
        crop_params = None if augment is None else AugmentParams.draw(g.num_random_crops, rng, augment)
        for stack, starts, params in ((base_out, g.base_starts(), base_params),
                                      (crop_out, g.random_starts(centres), crop_params)):  # fmt: skip
            for c, (h, w) in enumerate(starts):
                crop = region[:, h : h + b, w : w + b]
                view = crop if params is None else spatial_view(crop, params, c)
                scale_window(view, window, context.intensity_range, out=stack[c, 0])
        if resize:  # VoCo v1: Resized(mode="bilinear", align_corners=True) to 64^3
            base_out, crop_out = (
                _resized(base_out, g.crop_shape, bases),
                _resized(crop_out, g.crop_shape, crops),
            )
        if augment is not None:
            apply_intensity(base_out, base_params)
            apply_intensity(crop_out, crop_params)
        labels = torch.from_numpy(g.overlap_labels(centres).astype(np.float32))
        return {"voco_bases": base_out, "voco_crops": crop_out, "voco_labels": labels}


def _size3(values: Any, name: str) -> Size3:
    size = tuple(int(v) for v in values)
    if len(size) != 3 or min(size) < 1:
        raise ViewError(f"{name} must be three positive voxel counts (D, H, W), got {values!r}")
    return size


def _resized(x: torch.Tensor, size: Size3, out: torch.Tensor | None) -> torch.Tensor:
    resized = F.interpolate(x, size=size, mode="trilinear", align_corners=True)
    return resized if out is None else out.copy_(resized)
