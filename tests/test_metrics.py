from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import SilorecError
from common.metrics import (
    evaluate,
    load_ranks,
    metrics_from_ranks,
    most_pop,
    paired_difference,
    save_ranks,
    target_ranks,
)
from common.silo import load_silo
from common.split import EvalCase, leave_one_out


def test_hand_worked_ranking():
    # items:        0    1    2    3    4    5
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.7, 0.7, 0.1, 0.8],  # target 2 (0.7): 0 and 5 above, 3 ties -> 4; mask 0 -> 3
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 5: best -> 1
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all alike: ties count against -> last of 6 -> 6
        ]
    )
    cases = [
        EvalCase("a", np.array([0]), 2),
        EvalCase("b", np.array([], dtype=np.int64), 5),
        EvalCase("c", np.array([5, 5]), 1),
    ]
    ranks = target_ranks(scores, cases)
    assert ranks.tolist() == [3, 1, 5]  # row c: item 5 masked, so 5 candidates remain
    m = metrics_from_ranks(ranks, ks=(1, 3))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1.0) / 3)
    assert m["mrr@3"] == pytest.approx((1 / 3 + 1.0) / 3)
    assert m["users"] == 3


def test_nonfinite_scores_are_an_error():
    with pytest.raises(ValueError, match="non-finite"):
        target_ranks(torch.tensor([[0.0, float("nan")]]), [EvalCase("a", np.array([]), 0)])


def test_batched_evaluation_equals_unbatched():
    rng = np.random.default_rng(0)
    table = torch.as_tensor(rng.normal(size=(50, 30)))
    cases = [EvalCase(str(u), rng.choice(30, size=4, replace=False), int(rng.integers(30))) for u in range(50)]

    def score(batch):
        return table[[int(c.user_id) for c in batch]]

    assert evaluate(score, cases, batch_size=7) == evaluate(score, cases, batch_size=1000)


def test_paired_difference_is_the_difference_of_means_with_a_bootstrap_interval():
    # user 1: rank 1 vs 3 (1 − 0.5 = +0.5); user 2: rank 20 (outside the top 10) vs 1 (0 − 1 = −1)
    hand = paired_difference(np.array([1, 20]), np.array([3, 1]), samples=200)
    assert hand["difference"] == pytest.approx((0.5 - 1.0) / 2)
    assert hand["low"] == pytest.approx(-1.0) and hand["high"] == pytest.approx(0.5)  # both users drawn twice
    same = paired_difference(np.array([1, 4, 50]), np.array([1, 4, 50]))
    assert same["difference"] == same["low"] == same["high"] == 0.0

    rng = np.random.default_rng(0)
    a = rng.integers(1, 40, size=1000)
    better = a.copy()
    better[:40] = 1  # a better model on 4% of users, the same elsewhere
    gain = paired_difference(better, a)
    assert 0 < gain["low"] < gain["difference"] < gain["high"]
    # pairing removes what the two models share: narrower than the normal interval of two independent means
    g = [np.where(r <= 10, 1 / np.log2(r + 1), 0.0) for r in (better, a)]
    unpaired = 2 * 1.96 * math.sqrt(sum(x.var() / len(x) for x in g))
    assert gain["high"] - gain["low"] < 0.7 * unpaired
    other = a.copy()
    other[40:80] = 1  # as much better, on other users
    tie = paired_difference(better, other)
    assert tie["low"] < 0 < tie["high"]
    with pytest.raises(ValueError, match="over the same users"):
        paired_difference(np.array([1, 2]), np.array([1]))


def test_most_pop_ranks_by_training_counts(synthetic_silo):
    s = load_silo(synthetic_silo)
    split = leave_one_out(s.interactions, s.n_items)
    mp = most_pop(split)
    assert mp["test"]["users"] == len(split.test)
    assert 0.0 < mp["test"]["hr@20"] < 1.0


def test_paired_difference_over_runs_averages_each_users_difference_first():
    # two runs on two users: user 1 gains +0.5 in run 1 and −0.5 in run 2 (mean 0), user 2 gains +1 twice
    a = np.array([[1, 1], [3, 1]])
    b = np.array([[3, 20], [1, 20]])
    pooled = paired_difference(a, b, samples=200)
    assert pooled["difference"] == pytest.approx(0.5) and pooled["users"] == 2
    assert pooled["low"] == pytest.approx(0.0) and pooled["high"] == pytest.approx(1.0)  # each user's mean drawn twice
    assert paired_difference(a[:1], b[:1])["difference"] == paired_difference(a[0], b[0])["difference"]
    with pytest.raises(ValueError, match="over the same users"):
        paired_difference(a, b[:, :1])


def test_runs_pair_by_user_id_and_each_arm_is_averaged_over_its_draws(tmp_path):
    from simulations.federated import compare_runs

    users = [f"u{i}" for i in range(200)]
    rng = np.random.default_rng(0)
    better = [tmp_path / f"better-{k}" for k in range(2)]
    worse = [tmp_path / "worse"]
    for folder, top in [(f, 3) for f in better] + [(f, 30) for f in worse]:
        folder.mkdir()
        ranks = {u: int(rng.integers(1, top + 1)) for u in reversed(users)}  # written in another order than read
        save_ranks(folder, {"valid": ranks, "test": ranks}, model="test")
    report = compare_runs(better, worse)
    a = np.array([[load_ranks(f)["test"][u] for u in sorted(users)] for f in better])
    b = np.array([[load_ranks(worse[0])["test"][u] for u in sorted(users)]])
    assert report["test"]["difference"] == pytest.approx(paired_difference(a, b)["difference"])
    assert report["test"]["difference"] > 0.2
    assert report["test"]["low"] > 0 and report["test"]["runs"] == 2 and report["test"]["against"] == 1
    save_ranks(worse[0], {"valid": {"u0": 1}, "test": {"u0": 1}}, model="test")
    with pytest.raises(SilorecError, match="other valid users"):
        compare_runs(better, worse)
    with pytest.raises(SilorecError, match="no per-user ranks"):
        load_ranks(tmp_path)
