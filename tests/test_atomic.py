from __future__ import annotations

import pytest

from common import atomic


def test_directory_is_all_or_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as d:
            (d / "half.csv").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic.directory(target) as d:
        (d / "ok.csv").write_text("y")
    assert (target / "ok.csv").read_text() == "y"


def test_replace_swaps_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with atomic.directory(target) as d:
        (d / "v1").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.directory(target, replace=True) as d:
            raise RuntimeError("crash")
    assert (target / "v1").exists()
    with atomic.directory(target, replace=True) as d:
        (d / "v2").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["v2"]


def test_write_json_leaves_no_temporary_files(tmp_path):
    atomic.write_json(tmp_path / "a.json", {"k": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
