"""The downstream task registry: task names -> LightningModule classes.

Built-in tasks register themselves with `@register_task("name")`; every module of
`downstream.tasks` is one task and is imported on first use (so a new task is a new file there,
listed nowhere). Third-party packages add tasks without touching fm3d by declaring an entry point
in the group `fm3d.tasks` (`name = "package.module:TaskClass"`, in their pyproject's
`[project.entry-points."fm3d.tasks"]`). `list_tasks()` and `build_task()` see both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint
from typing import Any, TypeVar

from fm3d.errors import Fm3dError
from fm3d.plugins import import_package_modules, load_entry_points

ENTRY_POINT_GROUP = "fm3d.tasks"
# Imported lazily, so `import downstream` stays cheap and a task module may import the registry.
TASKS_PACKAGE = "downstream.tasks"

_TASKS: dict[str, type] = {}
T = TypeVar("T", bound=type)


class TaskRegistryError(Fm3dError, LookupError):
    """A task name that is unknown or registered twice."""


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator that makes a `DownstreamTask` subclass buildable by `name`.

    The class gets a `task_name` attribute, which the CLI and the evaluation reports use.
    """

    def decorator(cls: T) -> T:
        existing = _TASKS.get(name)
        if existing is not None and existing is not cls:
            raise TaskRegistryError(
                f"task name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                f"pick another name for {cls.__module__}.{cls.__qualname__}"
            )
        cls.task_name = name
        _TASKS[name] = cls
        return cls

    return decorator


def discover_tasks(found: Iterable[EntryPoint] | None = None) -> dict[str, type]:
    """Every task: the modules of `downstream.tasks` and the `fm3d.tasks` entry points (or `found`).

    An entry point whose name is taken keeps the registered class (a package may name its own
    tasks in its entry points too); a broken one raises `PluginError` naming it.
    """
    import_package_modules(TASKS_PACKAGE)
    for name, cls in load_entry_points(ENTRY_POINT_GROUP, found).items():
        if name not in _TASKS:
            register_task(name)(cls)
    return _TASKS


def list_tasks() -> list[str]:
    """Names of every task: built-in ones and those installed through the `fm3d.tasks` entry points."""
    return sorted(discover_tasks())


def get_task(name: str) -> type:
    """The task class registered under `name`."""
    tasks = discover_tasks()
    if name not in tasks:
        raise TaskRegistryError(
            f"unknown downstream task {name!r}; known tasks: {sorted(tasks)}. Third-party tasks register "
            f"through the entry-point group {ENTRY_POINT_GROUP!r}."
        )
    return tasks[name]


def build_task(name: str, encoder: Any, **config: Any) -> Any:
    """Instantiate the task `name` around `encoder` (a module, export folder, .ckpt or encoder name)."""
    return get_task(name)(encoder=encoder, **config)
