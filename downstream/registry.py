"""The downstream task registry: task names -> LightningModule classes.

Built-in tasks register themselves with `@register_task("name")` when their module is imported;
third-party packages add tasks without touching fm3d by declaring an entry point in the group
`fm3d.tasks` (`name = "package.module:TaskClass"`, in their pyproject's
`[project.entry-points."fm3d.tasks"]`). `list_tasks()` and `build_task()` see both.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from fm3d.errors import Fm3dError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fm3d.tasks"
# Modules whose import registers the built-in tasks; imported lazily so `import downstream`
# stays cheap and a task module may import the registry without a cycle.
_BUILTIN_TASK_MODULES = (
    "downstream.tasks.segmentation",
    "downstream.tasks.classification",
    "downstream.tasks.survival",
    "downstream.tasks.zero_shot",
    "downstream.tasks.retrieval",
    "downstream.tasks.report_generation",
)

_TASKS: dict[str, type] = {}
T = TypeVar("T", bound=type)


class TaskRegistryError(Fm3dError, LookupError):
    """A task name that is unknown, registered twice, or whose entry point cannot be loaded."""


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


def _load_builtin_tasks() -> None:
    for module in _BUILTIN_TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only a missing task module itself is tolerated (it may not be installed/written yet);
            # a missing dependency inside an existing module is a real error.
            if exc.name != module:
                raise


def _load_entry_point_tasks() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _TASKS:
            continue
        try:
            cls = ep.load()
        except Exception as exc:
            raise TaskRegistryError(
                f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r} cannot be loaded "
                f"({exc}); fix or uninstall the package that declares it"
            ) from exc
        register_task(ep.name)(cls)


def _all_tasks() -> dict[str, type]:
    _load_builtin_tasks()
    _load_entry_point_tasks()
    return _TASKS


def list_tasks() -> list[str]:
    """Names of every task: built-in ones and those installed through the `fm3d.tasks` entry points."""
    return sorted(_all_tasks())


def get_task(name: str) -> type:
    """The task class registered under `name`."""
    tasks = _all_tasks()
    if name not in tasks:
        raise TaskRegistryError(
            f"unknown downstream task {name!r}; known tasks: {sorted(tasks)}. Third-party tasks register "
            f"through the entry-point group {ENTRY_POINT_GROUP!r}."
        )
    return tasks[name]


def build_task(name: str, encoder: Any, **config: Any) -> Any:
    """Instantiate the task `name` around `encoder` (a module, export folder, .ckpt or encoder name)."""
    return get_task(name)(encoder=encoder, **config)
