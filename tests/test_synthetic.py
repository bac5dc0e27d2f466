from __future__ import annotations

from collections import Counter

from common.silo import load_silo
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


def test_same_seed_same_silo(tmp_path):
    a = make_synthetic_silo(tmp_path / "a", SyntheticSpec(seed=4))
    b = make_synthetic_silo(tmp_path / "b", SyntheticSpec(seed=4))
    assert (a / "interactions.csv").read_bytes() == (b / "interactions.csv").read_bytes()


def test_users_concentrate_on_one_category(synthetic_silo):
    s = load_silo(synthetic_silo)
    cats = s.items["category"].to_numpy()
    shares = []
    for _, g in s.interactions.groupby("user_id"):
        counts = Counter(cats[g["item"]])
        shares.append(counts.most_common(1)[0][1] / len(g))
    assert sum(shares) / len(shares) > 0.8  # planted: 90% in the favourite (plus chance)
