"""Segmentation classes from the data's own label names, so a config can never mislabel a cache.

A prepared cache may carry `labels.json` ({"<label value>": "<name>"}, written by
`fm3d demo-data` next to its manifest and copied into the cache by `fm3d prepare`). The names
in it are the truth about what each label value is: a config's `class_names` are looked up in
it, its `label_values` named from it, and a config giving both must agree with it. A config
whose names say "spleen" where the data says 1 = liver is refused, naming both, instead of
training a model that reports liver Dice as spleen's.
"""

from __future__ import annotations

import json
from pathlib import Path

from fm3d.data.cache import LABEL_NAMES_FILE
from fm3d.errors import Fm3dError

__all__ = ["LABEL_NAMES_FILE", "LabelNamesError", "read_label_names", "resolve_classes"]


class LabelNamesError(Fm3dError, ValueError):
    """Class names or label values that do not fit the data's labels.json (names both and the fix)."""


def read_label_names(path: str | Path) -> dict[int, str]:
    """{label value: name} of a labels.json file ({"1": "liver", ...}); background 0 may be absent."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelNamesError(
            f"cannot read the label names {path} ({exc}); it must be JSON like "
            '{"1": "liver", "2": "spleen"}'
        ) from exc
    try:
        return {int(value): str(name) for value, name in raw.items()}
    except (AttributeError, ValueError) as exc:
        raise LabelNamesError(
            f'{path} must map integer label values to names, like {{"1": "liver"}}; got {raw!r:.80}'
        ) from exc


def resolve_classes(
    label_values: list[int] | None,
    class_names: list[str] | None,
    names: dict[int, str] | None,
    source: str | Path | None,
) -> tuple[list[int], list[str]]:
    """The (label values, class names) to segment, checked against the data's `names` from `source`.

    With `names`: neither given -> every named foreground value; only names -> their values;
    only values -> their names; both -> they must agree pair by pair. Without `names` both
    must be given, one name per value.
    """
    if names is None:
        if label_values is None or class_names is None:
            raise LabelNamesError(
                f"the data has no {LABEL_NAMES_FILE} naming its label values, so the config must give both "
                "data.label_values and data.class_names (one name per value), or put a "
                f'{LABEL_NAMES_FILE} ({{"1": "liver", ...}}) in the cache / pass data.label_names'
            )
        if len(label_values) != len(class_names):
            raise LabelNamesError(f"{len(label_values)} label_values but {len(class_names)} class_names")
        return list(label_values), list(class_names)
    foreground = {v: n for v, n in sorted(names.items()) if v != 0}
    if label_values is None and class_names is None:
        return list(foreground), list(foreground.values())
    if label_values is None:
        by_name = {n: v for v, n in foreground.items()}
        unknown = [n for n in class_names if n not in by_name]
        if unknown:
            raise LabelNamesError(
                f"class_names {unknown} are not label names of {source}; its names are "
                f"{sorted(by_name)} (set data.class_names to some of them, or null for all)"
            )
        return [by_name[n] for n in class_names], list(class_names)
    unnamed = [v for v in label_values if v not in foreground]
    if unnamed:
        raise LabelNamesError(
            f"label_values {unnamed} have no name in {source} (it names {foreground}); "
            "drop them from data.label_values or add them to that file"
        )
    if class_names is None:
        return list(label_values), [foreground[v] for v in label_values]
    if len(label_values) != len(class_names):
        raise LabelNamesError(f"{len(label_values)} label_values but {len(class_names)} class_names")
    wrong = [
        f"{v} = {foreground[v]!r} there but {n!r} in class_names"
        for v, n in zip(label_values, class_names, strict=True)
        if foreground[v] != n
    ]
    if wrong:
        raise LabelNamesError(
            f"class_names disagree with the data's label names in {source}: "
            + "; ".join(wrong)
            + " (set data.class_names to null to take the data's names, or fix data.label_values)"
        )
    return list(label_values), list(class_names)
