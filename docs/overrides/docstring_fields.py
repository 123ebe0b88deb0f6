"""Griffe extension of the docs site: the house docstrings' `name: text` fields as Markdown lists.

fm3d's docstrings describe parameters and attributes as `name: what it is` lines, either under
an `Args:` / `Attributes:` header or on their own after the summary (see STYLE.md: prose, not
Google or NumPy sections). Python-Markdown runs such lines together into one paragraph, and
griffe's Google parser warns on the house forms (`start, end: ...`, `(lr, ...: see X.)`), which
fail the strict build. This extension leaves the words alone and only changes their markup:
each field becomes a list item with its names as code, and a literal `<name>` (a path pattern
such as `<run>/predictions`) is escaped so the browser shows it instead of dropping it as a tag.
mkdocs.yml loads it for the API pages (mkdocstrings `extensions:`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

# Section headers whose indented lines are fields (Google-style blocks, as the house writes them).
BLOCK_HEADERS = ("Args:", "Arguments:", "Attributes:", "Returns:")
# `name: text`, `a, b, c: text`, or the `(a, b: see X.)` pointer lines; names may carry * or **.
FIELD = re.compile(r"^(?P<open>\(?)(?P<names>\**[A-Za-z_]\w*(?:, \**[A-Za-z_]\w*)*):(?P<text>\s.*|$)")
# `<` opening something tag-like, outside code spans (split on backticks, odd parts are code).
TAG_OPEN = re.compile(r"<(?=[A-Za-z_/])")


def _escape_tags(line: str) -> str:
    """`line` with tag-like `<` outside `code` spans written as `&lt;` (shown, not parsed as HTML)."""
    parts = line.split("`")
    return "`".join(TAG_OPEN.sub("&lt;", part) if i % 2 == 0 else part for i, part in enumerate(parts))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _item(line: str, any_name: bool, known: set[str]) -> str | None:
    """The list item for a field line, or None when `line` is not a field.

    any_name: inside an `Args:`-style block every line at the block's indentation is a field;
        outside one, a line is a field only when its first name is a parameter or member.
    """
    match = FIELD.match(line)
    if match is None:
        return f"- {_escape_tags(line)}" if any_name else None
    names = match["names"].split(", ")
    if not any_name and names[0].strip("*") not in known:
        return None
    coded = ", ".join(f"`{name.strip('*')}`" for name in names)
    return f"- {match['open']}{coded}:{_escape_tags(match['text'])}"


def format_fields(text: str, known: set[str]) -> str:
    """`text` (a docstring) with its field lines as list items and continuation lines under them.

    known: the names a bare `name: text` line may document (parameters and members).
    """
    out: list[str] = []
    block_indent: int | None = None  # indentation of the fields under an Args:-style header
    in_list = False
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        indent = _indent(line)
        if not stripped:
            block_indent, in_list = None, False
            out.append("")
            continue
        if indent == 0 and stripped in BLOCK_HEADERS:
            following = next((ln for ln in lines[number + 1 :] if ln.strip()), "")
            block_indent, in_list = _indent(following), False
            title = "Arguments" if stripped == "Args:" else stripped[:-1]
            out.extend([*([""] if out and out[-1] else []), f"**{title}**", ""])
            continue
        if in_list and (block_indent is None or indent > block_indent) and indent > 0:
            out.append("    " + _escape_tags(stripped))  # continuation of the current item
            continue
        in_block = block_indent is not None and indent == block_indent
        if block_indent is not None and indent < block_indent:
            block_indent = None
        item = _item(stripped, in_block, known) if in_block or indent == 0 else None
        if item is not None:
            if not in_list and out and out[-1]:
                out.append("")
            out.append(item)
            in_list = True
            continue
        if in_list:
            out.append("")  # a paragraph after a list must not continue its last item
            in_list = False
        out.append(_escape_tags(line) if indent == 0 else line)
    return "\n".join(out)


def _known_names(obj: griffe.Object) -> set[str]:
    """Parameters (of a function, or of a class's constructor) and member names of `obj`."""
    names = set(obj.members)
    if isinstance(obj, griffe.Function | griffe.Class):
        names.update(parameter.name for parameter in obj.parameters)
    return names


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


class DocstringFields(griffe.Extension):
    """Rewrites every docstring of a loaded package with `format_fields`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None and not obj.is_module:
                obj.docstring.value = format_fields(obj.docstring.value, _known_names(obj))
