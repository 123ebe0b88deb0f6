"""Run folders: the order of the rules, unique names, the `latest` link, never overwriting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fm3d.train.runs import (
    RunFolderError,
    check_ckpt_path,
    new_run_dir,
    point_latest,
    resolve_run_dir,
    unique_path,
)


def test_run_dir_rules(tmp_path: Path) -> None:
    assert resolve_run_dir("a", tmp_path, default_root_dir=tmp_path / "x", environ={}) == tmp_path / "x"
    assert resolve_run_dir("a", tmp_path, environ={"FM3D_RUN_DIR": "/r"}) == Path("/r")
    assert resolve_run_dir("a", tmp_path, environ={"SLURM_JOB_ID": "42"}) == tmp_path / "a" / "slurm-42"
    assert resolve_run_dir("a", tmp_path, environ={"TORCHELASTIC_RUN_ID": "job7"}) == tmp_path / "a" / "job7"
    stamped = resolve_run_dir("a", tmp_path, environ={"TORCHELASTIC_RUN_ID": "none"})
    assert stamped.parent == tmp_path / "a" and stamped.name[:2] == "20"
    with pytest.raises(RunFolderError, match="no earlier run of 'a'"):
        resolve_run_dir("a", tmp_path, ckpt_path="last", environ={})
    # torchrun without --rdzv-id: each process would stamp a folder of its own.
    with pytest.raises(RunFolderError, match=r"2 processes .* --trainer\.default_root_dir"):
        resolve_run_dir("a", tmp_path, environ={"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2"})
    single = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "1"}
    assert resolve_run_dir("a", tmp_path, environ=single).parent == tmp_path / "a"


def test_two_runs_in_one_second_get_two_folders(tmp_path: Path) -> None:
    first = new_run_dir(tmp_path)
    first.mkdir()
    second = new_run_dir(tmp_path)
    assert second != first and second.name.startswith(first.name[:15])


def test_latest_points_at_the_newest_run(tmp_path: Path) -> None:
    old, new = tmp_path / "demo" / "20260101-000000", tmp_path / "demo" / "20260101-000001"
    for run in (old, new):
        link = point_latest(run)
        (run / "marker").write_text(run.name)
    assert link == tmp_path / "demo" / "latest"
    assert os.readlink(link) == new.name  # relative: the runs folder can move
    assert (link / "marker").read_text() == new.name


def test_unique_path_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    assert unique_path(target) == target
    target.write_text("a")
    assert unique_path(target) == tmp_path / "config-2.yaml"
    (tmp_path / "config-2.yaml").write_text("b")
    assert unique_path(target) == tmp_path / "config-3.yaml"


def test_missing_checkpoint_is_named_with_the_fix(tmp_path: Path) -> None:
    check_ckpt_path(None)
    check_ckpt_path("last")
    (tmp_path / "x.ckpt").write_bytes(b"")
    check_ckpt_path(str(tmp_path / "x.ckpt"))
    with pytest.raises(RunFolderError, match=r"--ckpt_path .*nope\.ckpt: no such file; pass a checkpoint"):
        check_ckpt_path(str(tmp_path / "nope.ckpt"))
