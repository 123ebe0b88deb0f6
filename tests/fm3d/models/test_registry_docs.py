"""docs/encoders.md lists exactly the encoders `fm3d.list_encoders()` returns, so the page cannot drift."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fm3d

ENCODERS_PAGE = Path(__file__).resolve().parents[3] / "docs" / "encoders.md"
# A table row whose first cell is a backticked name: "| `vit3d_tiny` | 192 | ..."
_ROW = re.compile(r"^\|\s*`(?P<name>[a-z0-9_]+)`\s*\|", re.MULTILINE)
# The printed result of fm3d.list_encoders() in the page's example, over one or more comment lines.
_LISTED = re.compile(r"fm3d\.list_encoders\(\)\n((?:#.*\n)+)")


def test_encoder_tables_name_every_registered_encoder_once():
    rows = _ROW.findall(ENCODERS_PAGE.read_text())
    names = [name for name in rows if re.fullmatch(r"[a-z]+\d*d_[a-z0-9_]+", name)]
    assert sorted(names) == fm3d.list_encoders()


def test_the_list_encoders_example_prints_what_it_returns():
    found = _LISTED.search(ENCODERS_PAGE.read_text())
    assert found, "docs/encoders.md shows no fm3d.list_encoders() output"
    printed = "".join(line.lstrip("#").strip() for line in found.group(1).splitlines())
    assert ast.literal_eval(printed) == fm3d.list_encoders()
