"""Discovery: every module of a package found by scanning, entry points loaded or named when broken."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import fm3d
from fm3d.models import registry
from fm3d.plugins import PluginError, import_package_modules, load_entry_points


def _package(root: Path, name: str, modules: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("SEEN = []\n")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(textwrap.dedent(source))


def test_every_module_of_a_scanned_package_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _package(
        tmp_path,
        "scanned_pkg",
        {
            "beta": "from scanned_pkg import SEEN\nSEEN.append('beta')\n",
            "alpha": "from scanned_pkg import SEEN\nSEEN.append('alpha')\n",
        },
    )
    (tmp_path / "scanned_pkg" / "notes.txt").write_text("not a module")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = import_package_modules("scanned_pkg")
    assert [m.__name__ for m in modules] == ["scanned_pkg.alpha", "scanned_pkg.beta"]
    assert modules[0].SEEN == ["alpha", "beta"]


def test_entry_points_load_what_they_name_and_a_broken_one_names_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _package(tmp_path, "ep_pkg", {"things": "VALUE = 42\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [
        EntryPoint(name="answer", value="ep_pkg.things:VALUE", group="fm3d.test"),
        EntryPoint(name="module", value="ep_pkg.things", group="fm3d.test"),
    ]
    loaded = load_entry_points("fm3d.test", found)
    assert loaded["answer"] == 42 and loaded["module"].__name__ == "ep_pkg.things"
    broken = [EntryPoint(name="broken", value="no_such_module_here:Thing", group="fm3d.test")]
    with pytest.raises(PluginError, match=r"'broken' = 'no_such_module_here:Thing' in group 'fm3d.test'"):
        load_entry_points("fm3d.test", broken)


def test_a_third_party_family_arrives_through_the_fm3d_encoders_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real module outside fm3d that declares a family and one size; the entry point names it.
    _package(
        tmp_path,
        "outside_family",
        {
            "mlp3d": """
            from dataclasses import dataclass
            from typing import ClassVar

            import torch
            from torch import nn

            from fm3d.models.config import EncoderConfig
            from fm3d.models.encoder import EncoderFamily, EncoderOutput
            from fm3d.models.registry import register_encoder, register_family

            @dataclass
            class Mlp3DConfig(EncoderConfig):
                family: ClassVar[str] = "mlp3d"
                width: int = 8

            class Mlp3D(nn.Module):
                def __init__(self, config):
                    super().__init__()
                    self.config, self.embed_dim = config, config.width
                    self.proj = nn.Linear(1, config.width)

                def forward(self, x, hidden_layers=None):
                    tokens = self.proj(x.flatten(2).transpose(1, 2))
                    return EncoderOutput(tokens, tokens.mean(1), tuple(x.shape[2:]))

            register_family(EncoderFamily(Mlp3DConfig, width=lambda c: c.width, depth=lambda c: 1))

            @register_encoder("mlp3d_test")
            def mlp3d_test(**overrides):
                return Mlp3D(Mlp3DConfig.with_overrides(Mlp3DConfig(name="mlp3d_test"), **overrides))
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.discover_families()  # the built-ins land in the real registry before it is swapped
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.discover_families([EntryPoint("mlp3d", "outside_family.mlp3d", registry.ENTRY_POINT_GROUP)])
    assert "mlp3d" in registry.list_families() and "mlp3d_test" in fm3d.list_encoders()
    encoder = registry.encoder_from_config(fm3d.create_encoder("mlp3d_test", width=4).config.to_dict())
    assert encoder(torch.zeros(2, 1, 2, 2, 2)).pooled.shape == (2, 4)
