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
from collections.abc import Callable, Iterable
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


class RegistryError(Fm3dError, LookupError):
    """A name that is unknown to a registry, or registered twice."""


class Registry:
    """Named classes found by scanning one package and one entry-point group.

    kind: what the entries are, for messages ("downstream task", "evaluation protocol").
    package: the package whose modules define the built-in entries, imported on first lookup.
    group: the entry-point group third-party packages declare theirs in.
    name_attribute: the class attribute `register` sets to the entry's name.
    error: the exception type raised for unknown or duplicate names.
    """

    def __init__(
        self,
        kind: str,
        package: str,
        group: str,
        name_attribute: str,
        error: type[Exception] = RegistryError,
    ) -> None:
        self.kind, self.package, self.group = kind, package, group
        self.name_attribute, self.error = name_attribute, error
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make the class findable by `name` (and set its name attribute)."""

        def decorator(cls: type) -> type:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls:
                raise self.error(
                    f"{self.kind} name {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; pick another name for "
                    f"{cls.__module__}.{cls.__qualname__}"
                )
            setattr(cls, self.name_attribute, name)
            self._entries[name] = cls
            return cls

        return decorator

    def discover(self, found: Iterable[EntryPoint] | None = None) -> dict[str, type]:
        """Every entry: the package's modules and the group's entry points (or `found`).

        An entry point whose name is taken keeps the registered class (a package may name its
        own entries in its entry points too); a broken one raises `PluginError` naming it.
        """
        import_package_modules(self.package)
        for name, cls in load_entry_points(self.group, found).items():
            if name not in self._entries:
                self.register(name)(cls)
        return self._entries

    def names(self) -> list[str]:
        """The names of every entry, built-in and installed."""
        return sorted(self.discover())

    def get(self, name: str) -> type:
        """The class registered under `name`."""
        entries = self.discover()
        if name not in entries:
            raise self.error(
                f"unknown {self.kind} {name!r}; known: {sorted(entries)}. Third-party ones register "
                f"through the entry-point group {self.group!r}."
            )
        return entries[name]
