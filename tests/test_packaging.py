"""pyproject.toml as setuptools reads it: no deprecated fields, every `fm3d` command an entry point."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_setuptools_reads_the_project_without_warnings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO_ROOT)  # readme and license-files are relative to the project root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
    assert (REPO_ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    commands = {ep.split("=")[0].strip() for ep in dist.entry_points["fm3d.commands"]}
    assert {"prepare", "pretrain", "finetune", "evaluate", "text-model", "causal-lm"} <= commands


def test_the_wheel_ships_the_library_and_its_three_applications_only(monkeypatch: pytest.MonkeyPatch):
    # docs/architecture.md: the applications stay top-level packages by these names, no others.
    monkeypatch.chdir(REPO_ROOT)
    dist = apply_configuration(Distribution(), "pyproject.toml")
    tops = {"fm3d", "pretrain", "downstream", "ehr"}
    assert {package.split(".")[0] for package in dist.packages} == tops
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for top in tops
        for init in (REPO_ROOT / top).rglob("__init__.py")
    }
    # Every code package ships (data-only folders such as downstream/prompts ship as namespace packages).
    assert on_disk <= set(dist.packages)
