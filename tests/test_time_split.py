from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.split import leave_one_out, parse_time, split_silo, time_split

DAY = 86_400 * 10**9


def frame(rows):
    """rows: (user, item index, day)."""
    return pd.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "item": [i for _, i, _ in rows],
            "timestamp": [d * DAY for _, _, d in rows],
        }
    )


def test_time_split_tests_after_the_cutoff_and_trains_only_up_to_train_until():
    rows = [("a", 0, 1), ("a", 1, 2), ("a", 2, 5), ("a", 3, 11), ("a", 4, 12)]  # a: 3 before day 10, 2 after
    rows += [("b", 5, 3), ("b", 6, 12)]  # b: one before, one after: tested, never validated
    rows += [("c", 7, 1), ("c", 8, 2)]  # c: nothing after: validated, never tested
    rows += [("d", 9, 20)]  # d: only after: nothing to score from
    s = time_split(frame(rows), 10, cutoff=10 * DAY, train_until=3 * DAY)
    cases = {c.user_id: (c.history.tolist(), c.target) for c in s.test}
    assert cases == {"a": ([0, 1, 2], 3), "b": ([5], 6)}
    assert {c.user_id: (c.history.tolist(), c.target) for c in s.valid} == {"a": ([0, 1], 2), "c": ([7], 8)}
    assert dict(zip(s.user_ids, (t.tolist() for t in s.train))) == {"a": [0, 1], "b": [5], "c": [7], "d": []}
    # trained up to the cutoff: the validation target still never trains
    later = time_split(frame(rows), 10, cutoff=10 * DAY)
    assert dict(zip(later.user_ids, (t.tolist() for t in later.train)))["a"] == [0, 1]
    assert [c.target for c in later.test] == [c.target for c in s.test]  # the same cases for both models
    with pytest.raises(ValueError, match="test period"):
        time_split(frame(rows), 10, cutoff=3 * DAY, train_until=10 * DAY)


def test_dates_parse_as_utc_and_no_cutoff_is_leave_one_out():
    assert parse_time("1970-01-02") == DAY and parse_time("86400") == DAY
    assert parse_time("1970-01-02T01:00+01:00") == DAY
    with pytest.raises(ValueError, match="not a date"):
        parse_time("soon")
    rows = [("a", i, i) for i in range(5)]
    a, b = split_silo(frame(rows), 5), leave_one_out(frame(rows), 5)
    assert [c.target for c in a.test] == [c.target for c in b.test] and np.array_equal(a.train[0], b.train[0])
    with pytest.raises(ValueError, match="needs a cutoff"):
        split_silo(frame(rows), 5, train_until="1970-01-02")


def test_a_federation_on_the_time_split_tests_the_users_active_after_the_cutoff(tmp_path, tiny_bert):
    import json

    from click.testing import CliRunner

    from common.silo import load_silo
    from simulations.cli import main as sim
    from simulations.synthetic import SyntheticSpec, make_synthetic_silo

    data = make_synthetic_silo(tmp_path / "shop", SyntheticSpec(users=60, seed=2))
    stamps = pd.read_csv(data / "interactions.csv")["timestamp"]
    cutoff, until = int(stamps.quantile(0.8)), int(stamps.quantile(0.5))
    out = tmp_path / "run"
    args = ["run", "--data", str(data), "--out", str(out), "--merchants", "2", "--scheme", "region"]
    args += ["--rounds", "1", "--epsilon", "8", "--delta", "1e-3", "--batch-size", "16", "--base-model", str(tiny_bert)]
    bad = CliRunner().invoke(sim, [*args, "--cutoff", str(until), "--train-until", str(cutoff)])
    assert bad.exit_code == 2 and "--train-until" in bad.output and not out.exists()
    done = CliRunner().invoke(sim, [*args, "--cutoff", str(cutoff), "--train-until", str(until)])
    assert done.exit_code == 0, done.output
    expected = time_split(load_silo(data).interactions, 48, cutoff=cutoff * 10**9, train_until=until * 10**9)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["test"]["users"] == len(expected.test) < 60
    assert len(json.loads((out / "ranks.json").read_text())["test"]) == len(expected.test)
