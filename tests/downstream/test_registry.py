"""Task registry: decorator registration, lookups, errors, and a third-party task via a real entry point."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from downstream import registry
from downstream.base import DownstreamTask
from downstream.registry import TaskRegistryError, build_task, get_task, list_tasks, register_task
from fm3d.plugins import PluginError

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "image_size": (16, 16, 16)}


def test_builtin_tasks_are_listed() -> None:
    assert {"segmentation", "classification", "survival"} <= set(list_tasks())
    assert get_task("segmentation").task_name == "segmentation"


def test_build_task_creates_the_encoder_from_a_registry_name() -> None:
    task = build_task("classification", encoder="vit3d_tiny", class_names=["a", "b"], encoder_overrides=TINY)
    assert task.encoder.config.embed_dim == 32
    assert task.head[-1].out_features == 2


def test_unknown_and_duplicate_names_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TaskRegistryError, match=r"unknown downstream task .*known:"):
        get_task("no-such-task")

    class First(DownstreamTask):
        pass

    class Second(DownstreamTask):
        pass

    monkeypatch.setattr(registry.TASKS, "_entries", dict(registry.TASKS._entries))
    register_task("twice")(First)
    with pytest.raises(TaskRegistryError, match="already registered"):
        register_task("twice")(Second)


def test_third_party_task_through_the_fm3d_tasks_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real installed distribution: a package plus its dist-info with entry_points.txt, on sys.path.
    package = tmp_path / "echo_tasks"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            from torch import nn
            from downstream.base import DownstreamTask

            class EchoTask(DownstreamTask):
                """A linear head on the pooled embedding, defined outside fm3d."""

                def __init__(self, encoder, width: int = 3, **kwargs):
                    super().__init__(encoder, **kwargs)
                    self.head = nn.Linear(self.encoder.embed_dim, width)
            '''
        )
    )
    dist_info = tmp_path / "echo_tasks-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-tasks\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[fm3d.tasks]\necho = echo_tasks:EchoTask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.TASKS, "_entries", dict(registry.TASKS._entries))

    assert "echo" in list_tasks()
    task = build_task("echo", encoder="vit3d_tiny", width=5, encoder_overrides=TINY)
    assert type(task).__module__ == "echo_tasks" and task.task_name == "echo"
    assert task.head.out_features == 5


def test_broken_entry_point_names_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist_info = tmp_path / "broken_tasks-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-tasks\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[fm3d.tasks]\nbroken = not_a_module_anywhere:Task\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.TASKS, "_entries", dict(registry.TASKS._entries))
    with pytest.raises(PluginError, match=r"'broken'.*not_a_module_anywhere.*'fm3d.tasks'"):
        list_tasks()


def test_discovery_scans_the_tasks_package_and_takes_given_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The built-ins come from scanning downstream/tasks; each task module registers itself there.
    tasks = registry.discover_tasks()
    builtin = {"segmentation", "classification", "survival", "zero_shot", "retrieval", "report_generation"}
    assert builtin <= set(tasks)
    assert all(tasks[name].__module__ == f"downstream.tasks.{name}" for name in builtin)
    package = tmp_path / "given_tasks"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from downstream.base import DownstreamTask\n\nclass GivenTask(DownstreamTask):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.TASKS, "_entries", dict(registry.TASKS._entries))
    found = [
        EntryPoint("given", "given_tasks:GivenTask", registry.ENTRY_POINT_GROUP),
        # A name already taken keeps its registered class.
        EntryPoint("classification", "given_tasks:GivenTask", registry.ENTRY_POINT_GROUP),
    ]
    tasks = registry.discover_tasks(found)
    assert tasks["given"].__name__ == "GivenTask" and tasks["given"].task_name == "given"
    assert tasks["classification"].__module__ == "downstream.tasks.classification"
