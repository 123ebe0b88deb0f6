"""The suite's YAML: the studies, the protocols with their settings, the bootstrap and the seed.

    name: demo                    # the run goes to <runs_root>/eval/<name>/<timestamp>
    seed: 0                       # random weights, probe initialisation, bootstrap draws
    data:
      cache_dir: demo/cache       # prepared studies (`fm3d prepare`)
      split_fractions: [0.5, 0.1, 0.4]   # train / val / test patients
      split_seed: 0
    features_dir: runs/eval_features     # cached features, shared by every run of every suite
    bootstrap: {resamples: 1000, confidence: 0.95}
    protocols:                    # name -> settings (the protocol class's constructor arguments)
      linear_probe: {labels: demo/findings.parquet}

Keys are checked: a misspelt one is an error naming the known ones, not a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fm3d.errors import Fm3dError


class SuiteConfigError(Fm3dError, ValueError):
    """A suite YAML that cannot be read or has unknown or malformed keys."""


@dataclass(frozen=True)
class SuiteData:
    """Where the studies are and how they are split by patient."""

    cache_dir: Path
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0


@dataclass(frozen=True)
class BootstrapSettings:
    """Patient-level bootstrap: how many resamples and the interval's coverage."""

    resamples: int = 1000
    confidence: float = 0.95


@dataclass(frozen=True)
class SuiteConfig:
    """A whole suite (see the module docstring)."""

    name: str
    data: SuiteData
    protocols: dict[str, dict[str, Any]]
    seed: int = 0
    features_dir: Path = Path("runs/eval_features")
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> SuiteConfig:
        """Build and check a config from the parsed YAML."""
        if not isinstance(raw, dict):
            raise SuiteConfigError(f"{source}: a suite config is a mapping, got {type(raw).__name__}")
        _check_keys(raw, cls, source, "")
        data = raw.get("data")
        if not isinstance(data, dict) or "cache_dir" not in data:
            raise SuiteConfigError(f"{source}: needs data.cache_dir (a folder written by `fm3d prepare`)")
        _check_keys(data, SuiteData, source, "data.")
        bootstrap = raw.get("bootstrap") or {}
        _check_keys(bootstrap, BootstrapSettings, source, "bootstrap.")
        protocols = raw.get("protocols")
        if not isinstance(protocols, dict) or not protocols:
            raise SuiteConfigError(f"{source}: needs protocols: a mapping of protocol name -> settings")
        settings = BootstrapSettings(**bootstrap)
        if settings.resamples < 1 or not 0 < settings.confidence < 1:
            raise SuiteConfigError(
                f"{source}: bootstrap.resamples must be >= 1 and bootstrap.confidence in (0, 1), "
                f"got {bootstrap}"
            )
        fractions = data.get("split_fractions", SuiteData.split_fractions)
        if len(fractions) != 3:
            raise SuiteConfigError(f"{source}: data.split_fractions are three numbers (train, val, test)")
        return cls(
            name=str(raw.get("name") or "suite"),
            data=SuiteData(
                Path(data["cache_dir"]),
                tuple(float(f) for f in fractions),
                int(data.get("split_seed", SuiteData.split_seed)),
            ),
            protocols={str(name): dict(values or {}) for name, values in protocols.items()},
            seed=int(raw.get("seed", 0)),
            features_dir=Path(raw.get("features_dir") or cls.features_dir),
            bootstrap=settings,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SuiteConfig:
        """Read a suite YAML."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SuiteConfigError(f"cannot read the suite config {path}: {exc}") from exc
        return cls.from_dict(raw, str(path))


def _check_keys(raw: dict[str, Any], cls: type, source: str, prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SuiteConfigError(
            f"{source}: unknown key(s) {[prefix + k for k in unknown]}; "
            f"known: {sorted(prefix + k for k in known)}"
        )
