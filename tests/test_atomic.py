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
    assert sorted(p.name for p in target.iterdir()) == [atomic.MARKER, "v2"] and atomic.is_ours(target)


def test_write_json_leaves_no_temporary_files(tmp_path):
    atomic.write_json(tmp_path / "a.json", {"k": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_only_a_folder_silorec_made_may_be_replaced_and_outputs_stay_apart_from_inputs(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep").write_text("k")
    with pytest.raises(atomic.OutputError, match="did not write"):
        with atomic.directory(theirs, replace=True):
            pass
    with pytest.raises(atomic.OutputError, match="did not write"):
        atomic.remove_ours(theirs)
    assert (theirs / "keep").read_text() == "k"
    (tmp_path / "empty").mkdir()
    with atomic.directory(tmp_path / "empty") as d:  # an empty folder holds nothing to lose
        (d / "x").write_text("x")
    data = tmp_path / "data"
    for out, relation in ((data, "the same folder as"), (data / "run", "inside"), (tmp_path, "a folder holding")):
        with pytest.raises(atomic.OutputError, match=relation):
            atomic.check_apart(out, {"--data": data})
    atomic.check_apart(tmp_path / "run", {"--data": data})
