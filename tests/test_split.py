from __future__ import annotations

import numpy as np
import pandas as pd

from common.split import EvalCase, leave_one_out


def frame(rows):
    df = pd.DataFrame(rows, columns=["user_id", "item", "timestamp"])
    df["item_id"] = df["item"].astype(str)
    return df


def test_hand_worked_split_with_ties():
    # u1: items 0@5, 1@3, 2@5, 3@9, 4@5 (file order). Stable by time: 1@3, 0@5, 2@5, 4@5, 3@9.
    # u2: 2 interactions -> trains on both, not evaluated.
    # u3: exactly 3 -> train [a], valid b, test c.
    rows = [
        ("u1", 0, 5),
        ("u2", 7, 1),
        ("u1", 1, 3),
        ("u3", 5, 10),
        ("u1", 2, 5),
        ("u1", 3, 9),
        ("u3", 6, 11),
        ("u1", 4, 5),
        ("u2", 8, 1),
        ("u3", 4, 10),
    ]
    s = leave_one_out(frame(rows), n_items=9)
    assert s.user_ids == ["u1", "u2", "u3"]
    assert [t.tolist() for t in s.train] == [[1, 0, 2], [7, 8], [5]]
    assert [(c.user_id, c.history.tolist(), c.target) for c in s.valid] == [("u1", [1, 0, 2], 4), ("u3", [5], 4)]
    assert [(c.user_id, c.history.tolist(), c.target) for c in s.test] == [("u1", [1, 0, 2, 4], 3), ("u3", [5, 4], 6)]


def test_test_targets_are_each_users_last_interaction():
    rng = np.random.default_rng(0)
    rows = [(f"u{rng.integers(20)}", int(rng.integers(50)), int(rng.integers(5))) for _ in range(400)]
    df = frame(rows)
    s = leave_one_out(df, n_items=50)
    for case in s.test:
        mine = df[df["user_id"] == case.user_id]
        last_time = mine["timestamp"].max()
        assert case.target == mine[mine["timestamp"] == last_time]["item"].iloc[-1]
        assert len(case.history) == len(mine) - 1


def test_masking_excludes_history_but_not_the_target():
    case = EvalCase("u", np.array([3, 1, 3, 2]), target=2)
    assert case.masked_items().tolist() == [1, 3]
    assert EvalCase("u", np.array([4, 5]), target=0).masked_items().tolist() == [4, 5]
