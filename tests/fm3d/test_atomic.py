"""fm3d.atomic: a reader sees the whole old output or the whole new one, whatever fails in between."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fm3d.atomic import atomic_folder, atomic_path, write_text_atomic


def _folder(path: Path, text: str) -> None:
    path.mkdir()
    (path / "a.txt").write_text(text)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_folder_is_swapped_whole(tmp_path):
    target = tmp_path / "text"
    _folder(target, "old")
    (target / "stale.txt").write_text("from the old export")
    with atomic_folder(target) as temp:
        (temp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # nothing of the old folder mixed in
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["text"]


def test_a_failed_block_leaves_the_old_folder(tmp_path):
    target = tmp_path / "text"
    _folder(target, "old")
    with pytest.raises(RuntimeError), atomic_folder(target) as temp:
        (temp / "a.txt").write_text("half")
        raise RuntimeError("save_pretrained failed")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["text"]


def test_a_swap_that_fails_half_way_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "text"
    _folder(target, "old")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the old folder is already aside; the new one cannot move in
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="No space left"), atomic_folder(target) as temp:
        (temp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["text"]
