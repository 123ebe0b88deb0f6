"""MkDocs hooks of the docs site (mkdocs.yml `hooks:`).

Heading ids must also be valid CSS selectors: the theme's contents sidebar (Bootstrap's
ScrollSpy) looks each one up with `querySelector("#id")`, and an id that starts with a digit,
as a numbered heading's does ("## 1. The demo" -> `1-the-demo`), throws there and stops every
script of the page (contents highlighting, table styling, keyboard shortcuts).
"""

from __future__ import annotations

from typing import Any

from markdown.extensions.toc import slugify


def css_safe_slugify(value: str, separator: str) -> str:
    """Python-Markdown's slug, with `section-` in front when it would start with a digit."""
    slug = slugify(value, separator)
    return f"section{separator}{slug}" if slug[:1].isdigit() else slug


def on_config(config: Any) -> Any:
    """Use `css_safe_slugify` for every page's heading ids."""
    config.mdx_configs.setdefault("toc", {})["slugify"] = css_safe_slugify
    return config
