"""Discovery of extension modules: every module of a package, and the entry points of a group.

Registries (encoder families, downstream tasks) fill themselves when the modules that define
their entries are imported. Built-in entries are found by importing every module of one
package, so adding a family or a task is adding a file; third-party packages declare an entry
point in a named group (`[project.entry-points."fm3d.encoders"]` in their pyproject), so they
need no change to fm3d. Nothing is listed by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

from fm3d.errors import Fm3dError


class PluginError(Fm3dError, ImportError):
    """An entry point that names something that cannot be imported."""


def import_package_modules(package: str) -> list[ModuleType]:
    """Import every module directly inside `package` (sub-packages included, not their contents).

    A module that fails to import raises as it is: a broken built-in is a bug to see, not skip.
    """
    root = importlib.import_module(package)
    return [
        importlib.import_module(f"{package}.{info.name}")
        for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda info: info.name)
    ]


def load_entry_points(group: str, found: Iterable[EntryPoint] | None = None) -> dict[str, Any]:
    """name -> loaded object of every entry point in `group` (`found` replaces the installed ones).

    The object is what the entry point's value names: a module (`pkg.module`), whose import
    registers what it defines, or an attribute (`pkg.module:Name`).
    """
    loaded = {}
    for entry in entry_points(group=group) if found is None else found:
        try:
            loaded[entry.name] = entry.load()
        except Exception as exc:  # any failure inside a third-party import is that package's
            raise PluginError(
                f"entry point {entry.name!r} = {entry.value!r} in group {group!r} cannot be loaded "
                f"({type(exc).__name__}: {exc}); fix or uninstall the package that declares it"
            ) from exc
    return loaded
