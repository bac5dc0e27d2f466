from __future__ import annotations

import numpy as np

from common.records import UserRecords
from common.silo import load_silo
from common.split import leave_one_out


def split_of(path):
    s = load_silo(path)
    return leave_one_out(s.interactions, s.n_items)


def test_one_record_per_trainable_user_and_it_is_a_true_prefix(synthetic_silo):
    split = split_of(synthetic_silo)
    recs = UserRecords(split, seed=1)
    records = recs.records()
    assert len(records) == sum(len(h) >= 2 for h in split.train)
    assert len({r.user for r in records}) == len(records)
    for r in records:
        seq = split.train[r.user]
        t = len(r.history)
        assert 1 <= t < len(seq)
        assert r.history.tolist() == seq[:t].tolist() and r.target == seq[t]


def test_records_are_seeded_and_change_with_the_epoch(synthetic_silo):
    split = split_of(synthetic_silo)
    a, b = UserRecords(split, seed=1), UserRecords(split, seed=1)
    assert [len(r.history) for r in a.records()] == [len(r.history) for r in b.records()]
    first = [len(r.history) for r in a.records()]
    a.set_epoch(1)
    assert [len(r.history) for r in a.records()] != first


def test_last_cut_predicts_last_training_item(synthetic_silo):
    split = split_of(synthetic_silo)
    for r in UserRecords(split, cut="last").records():
        assert r.target == split.train[r.user][-1]
        assert np.array_equal(r.history, split.train[r.user][:-1])


def test_next_items_are_what_followed_the_prefix(synthetic_silo):
    split = split_of(synthetic_silo)
    for r in UserRecords(split, seed=2, next_items=3).records():
        seq = split.train[r.user]
        t = len(r.history)
        assert r.targets.tolist() == seq[t : t + 3].tolist() and 1 <= len(r.targets) <= 3
