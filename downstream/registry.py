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
from typing import Any

from fm3d.plugins import Registry, RegistryError

ENTRY_POINT_GROUP = "fm3d.tasks"
# Imported lazily, so `import downstream` stays cheap and a task module may import the registry.
TASKS_PACKAGE = "downstream.tasks"


class TaskRegistryError(RegistryError):
    """A task name that is unknown or registered twice."""


TASKS = Registry("downstream task", TASKS_PACKAGE, ENTRY_POINT_GROUP, "task_name", TaskRegistryError)


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator that makes a `DownstreamTask` subclass buildable by `name`.

    The class gets a `task_name` attribute, which the CLI and the evaluation reports use.
    """
    return TASKS.register(name)


def discover_tasks(found: Iterable[EntryPoint] | None = None) -> dict[str, type]:
    """Every task: the modules of `downstream.tasks` and the `fm3d.tasks` entry points (or `found`)."""
    return TASKS.discover(found)


def list_tasks() -> list[str]:
    """Names of every task: built-in ones and those installed through the `fm3d.tasks` entry points."""
    return TASKS.names()


def get_task(name: str) -> type:
    """The task class registered under `name`."""
    return TASKS.get(name)


def build_task(name: str, encoder: Any, **config: Any) -> Any:
    """Instantiate the task `name` around `encoder` (a module, export folder, .ckpt or encoder name)."""
    return get_task(name)(encoder=encoder, **config)
