"""Atomic output folders: all or nothing, and nothing left behind by an earlier writer that was killed."""
from __future__ import annotations

import pytest

from pipelines.atomic import atomic_directory


def _folder(path, text: str):
    path.mkdir()
    (path / "part-0").write_text(text)
    return path


def test_a_finished_write_replaces_the_output_whole(tmp_path):
    target = _folder(tmp_path / "dataset", "old")
    with atomic_directory(target) as staging:  # a path to create, as Spark's writer does
        _folder(staging, "new")
        assert (target / "part-0").read_text() == "old"  # readers see the old output until the swap
    assert (target / "part-0").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_a_failed_write_keeps_the_old_output_and_leaves_no_staging(tmp_path):
    target = _folder(tmp_path / "dataset", "old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_directory(target) as staging:
            _folder(staging, "half")
            raise RuntimeError("writer failed")
    assert (target / "part-0").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_what_a_killed_writer_left_is_removed_by_the_next_one(tmp_path):
    target = _folder(tmp_path / "dataset", "old")
    _folder(tmp_path / ".dataset.tmp-deadbeef", "half written")  # killed while writing
    _folder(tmp_path / ".dataset.old-cafebabe", "half deleted")  # killed while deleting the output it replaced
    _folder(tmp_path / ".other.tmp-deadbeef", "another output's")
    with atomic_directory(target) as staging:
        _folder(staging, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-deadbeef", "dataset"]
