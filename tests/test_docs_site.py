"""The docs site: `mkdocs build --strict` of docs/ (CI builds it here, as `make docs` does).

A broken link, a page left out of the nav, or an API entry naming a function that was renamed
fails this suite, not only a later docs deploy.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import fm3d

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
CONFIG = REPO_ROOT / "mkdocs.yml"


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of `config` into `site`, run from the repo root like `make docs`."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _nav_pages(nav: list[Any]) -> set[str]:
    """Every page path the nav names, however deeply nested."""
    pages: set[str] = set()
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_nav_names_every_page() -> None:
    """Each docs/**/*.md is in mkdocs.yml's nav, and each nav entry is a file."""
    nav = _nav_pages(yaml.safe_load(CONFIG.read_text())["nav"])
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert not pages - nav, f"pages missing from the nav of {CONFIG}: add them: {sorted(pages - nav)}"
    assert not nav - pages, f"{CONFIG} nav names pages that do not exist: {sorted(nav - pages)}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as CI builds it; the build must pass with warnings as errors."""
    site = tmp_path_factory.mktemp("site")
    result = _mkdocs_build(CONFIG, site)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return site


def test_site_has_every_page(site: Path) -> None:
    for page in DOCS.rglob("*.md"):
        assert (site / page.relative_to(DOCS).with_suffix(".html")).is_file(), page


def test_api_reference_documents_the_public_face(site: Path) -> None:
    """Every name in `fm3d.__all__` (but the version string) has its own entry on the API page."""
    html = (site / "api" / "fm3d.html").read_text()
    for name in fm3d.__all__:
        if name != "__version__":
            assert f'id="fm3d.{name}"' in html, f"docs/api/fm3d.md has no entry for fm3d.{name}"


def test_heading_ids_are_css_selectors(site: Path) -> None:
    """No id starts with a digit ("## 1. The demo"): the theme's contents sidebar looks ids up with
    querySelector, which throws on such an id and stops the page's scripts (docs/overrides/hooks.py)."""
    for page in site.rglob("*.html"):
        if page.name == "404.html":
            continue  # the theme's own template (a fixed "404-page-not-found" id, no contents sidebar)
        bad = re.findall(r'id="(\d[^"]*)"', page.read_text())
        assert not bad, f"{page.relative_to(site)}: ids starting with a digit: {bad[:3]}"


def test_docstring_fields_render_as_lists(site: Path) -> None:
    """mkdocs.yml loads the docstring_fields extension: `EncoderOutput`'s `name: text` fields come
    out as list items named in code (the rules themselves: the format_fields test below)."""
    html = (site / "api" / "fm3d.html").read_text()
    for field in ("tokens", "pooled", "grid", "hidden"):
        assert f"<li><code>{field}</code>:" in html, f"EncoderOutput.{field} is not a list item"


def _overrides_module(name: str) -> ModuleType:
    """docs/overrides/<name>.py, build-time code mkdocs.yml loads by path (not a package)."""
    spec = importlib.util.spec_from_file_location(name, DOCS / "overrides" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slugs_never_start_with_a_digit() -> None:
    slugify = _overrides_module("hooks").css_safe_slugify
    assert slugify("1. The demo: cohort", "-") == "section-1-the-demo-cohort"
    assert slugify("3D encoders", "-") == "section-3d-encoders"
    assert slugify("The run folder", "-") == "the-run-folder"  # unchanged: Python-Markdown's slug


def test_format_fields_keeps_the_words_and_marks_up_the_fields() -> None:
    format_fields = _overrides_module("docstring_fields").format_fields
    bare = "Returns.\n\ntokens: [B, N, C] at <run>/x `<kept>`.\npooled: one\n    vector.\nPlain: text."
    assert format_fields(bare, {"tokens", "pooled"}) == (
        "Returns.\n\n- `tokens`: [B, N, C] at &lt;run>/x `<kept>`.\n- `pooled`: one\n    vector."
        "\n\nPlain: text."  # not a parameter or member: stays a paragraph, after the list
    )
    block = "Sum.\nArgs:\n    a, b: first\n        more.\n    (c: see X.)\nReturns:\n    One row,\n    each."
    assert format_fields(block, set()) == (
        "Sum.\n\n**Arguments**\n\n- `a`, `b`: first\n    more.\n- (`c`: see X.)"
        "\n\n**Returns**\n\nOne row,\neach."  # Returns prose stays one paragraph
    )


def _broken_copy(tmp_path: Path, edits: dict[str, str]) -> Path:
    """A copy of docs/ and mkdocs.yml under `tmp_path` with `edits` (page -> text appended)."""
    docs = tmp_path / "docs"
    for source in DOCS.rglob("*"):
        if source.is_file():
            target = docs / source.relative_to(DOCS)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    for page, text in edits.items():
        with (docs / page).open("a") as file:
            file.write(text)
    config = tmp_path / "mkdocs.yml"
    # docs_dir and the code's search path are read relative to the config file: point them back.
    text = CONFIG.read_text().replace("docs_dir: docs", f"docs_dir: {docs}", 1)
    config.write_text(text.replace("paths: [.]", f"paths: [{REPO_ROOT}]", 1))
    return config


def test_broken_link_and_unlisted_page_fail_the_build(tmp_path: Path) -> None:
    edits = {"index.md": "\nSee [the old page](no-such-page.md).\n", "stray.md": "# Stray\n"}
    config = _broken_copy(tmp_path, edits)
    result = _mkdocs_build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr and "index.md" in result.stderr
    assert "stray.md" in result.stderr


def test_renamed_function_fails_the_build(tmp_path: Path) -> None:
    config = _broken_copy(tmp_path, {"api/fm3d.md": "\n::: fm3d.create_encoder_renamed\n"})
    result = _mkdocs_build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "fm3d.create_encoder_renamed" in result.stderr
