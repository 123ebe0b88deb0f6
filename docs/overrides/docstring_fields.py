"""Griffe extension of the docs site: the house docstrings' `name: text` fields as Markdown lists.

fm3d's docstrings describe parameters and attributes as `name: what it is` lines, either under
an `Args:` / `Attributes:` header or on their own after the summary. Python-Markdown runs such
lines together into one paragraph, and griffe's Google parser warns on the house forms
(`start, end: ...`, `(lr, ...: see X.)`), which fail the strict build. This extension leaves
the words alone and only changes their markup: each field becomes a list item with its names
as code, and a literal `<name>` (a path pattern such as `<run>/predictions`) is escaped so the
browser shows it instead of dropping it as a tag. mkdocs.yml loads it for the API pages
(mkdocstrings `extensions:`).
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


def _item(line: str, known: set[str] | None) -> str | None:
    """The list item for a field line (`name: text`), or None when `line` is not one.

    known: the names a field may document; None (inside an `Args:`-style block) accepts any.
    """
    match = FIELD.match(line)
    if match is None:
        return None
    names = match["names"].split(", ")
    if known is not None and names[0].strip("*") not in known:
        return None
    coded = ", ".join(f"`{name.strip('*')}`" for name in names)
    return f"- {match['open']}{coded}:{_escape_tags(match['text'])}"


def format_fields(text: str, known: set[str]) -> str:
    """`text` (a docstring) with its field lines as list items and their wrapped lines under them.

    known: the names a bare `name: text` line outside a header's block may document (parameters
        and members); under a header every `name: text` line at the block's indentation counts.
    """
    out: list[str] = []
    block_indent: int | None = None  # indentation of the lines under an Args:-style header
    in_list = False
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped, indent = line.strip(), _indent(line)
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
        if block_indent is not None and indent < block_indent:
            block_indent = None
        in_block = block_indent is not None
        field_indent = block_indent if in_block else 0
        item = _item(stripped, None if in_block else known) if indent == field_indent else None
        if item is not None:
            if not in_list and out and out[-1]:
                out.append("")
            out.append(item)
            in_list = True
        elif in_list and (indent > field_indent or in_block):
            out.append("    " + _escape_tags(stripped))  # the current field's text goes on
        else:
            if in_list:
                out.append("")  # a paragraph after a list must not continue its last item
                in_list = False
            # Prose under a header (a Returns: sentence) is dedented; outside one an indented
            # line may be a code block, so it stays as written.
            out.append(_escape_tags(stripped) if in_block or indent == 0 else line)
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
            yield from _objects(member)


class DocstringFields(griffe.Extension):
    """Rewrites every docstring of a loaded package with `format_fields`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None and not obj.is_module:
                obj.docstring.value = format_fields(obj.docstring.value, _known_names(obj))
