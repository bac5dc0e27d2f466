from __future__ import annotations

import json

import pytest

from common.errors import PartitionError
from common.silo import load_silo
from simulations.partition import plan, write_partition
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


@pytest.fixture
def silo(tmp_path):
    return load_silo(make_synthetic_silo(tmp_path / "src", SyntheticSpec(users=80, categories=6, seed=2)))


def rows(s):
    return set(zip(s.interactions["user_id"], s.interactions["item_id"], s.interactions["timestamp"]))


@pytest.mark.parametrize("scheme,merchants", [("region", 10), ("region", 3), ("dirichlet", 4)])
def test_user_schemes_are_disjoint_and_cover_every_user_and_interaction(tmp_path, silo, scheme, merchants):
    shares = plan(silo, merchants, scheme, seed=0, alpha=0.3)
    summaries = write_partition(silo, shares, tmp_path / "out", scheme=scheme, seed=0)
    parts = [load_silo(tmp_path / "out" / s.name) for s in summaries]
    users = [set(p.interactions["user_id"]) for p in parts]
    assert sum(len(u) for u in users) == len(set().union(*users)) == silo.interactions["user_id"].nunique()
    assert sum(len(p.interactions) for p in parts) == len(silo.interactions)
    assert set().union(*(rows(p) for p in parts)) == rows(silo)
    assert all(p.n_items == silo.n_items for p in parts)  # every merchant sells the whole catalog


def test_region_groups_by_zip_digit_with_an_extra_silo_for_other_codes(tmp_path, silo):
    silo.users.loc[silo.users.index[:3], "zip_code"] = ["T8H1N", "", "V3N4P"]
    shares = plan(silo, 10, "region")
    names = [s.name for s in shares]
    assert names == [f"region-{d}" for d in range(10)] + ["region-other"]
    zips = dict(zip(silo.users["user_id"], silo.users["zip_code"]))
    for share in shares[:-1]:
        assert {zips[u][0] for u in share.users} == {share.name[-1]}
    assert len(shares[-1].users) == 3
    assert [s.name for s in plan(silo, 3, "region")] == ["region-0123", "region-456", "region-789", "region-other"]


def test_dirichlet_is_seeded(silo):
    a = plan(silo, 4, "dirichlet", seed=5, alpha=0.5)
    b = plan(silo, 4, "dirichlet", seed=5, alpha=0.5)
    c = plan(silo, 4, "dirichlet", seed=6, alpha=0.5)
    assert [s.users for s in a] == [s.users for s in b]
    assert [s.users for s in a] != [s.users for s in c]


def test_catalog_scheme_gives_disjoint_categories_and_only_own_items(tmp_path, silo):
    shares = plan(silo, 3, "catalog")
    summaries = write_partition(silo, shares, tmp_path / "out", scheme="catalog", seed=0)
    parts = [load_silo(tmp_path / "out" / s.name) for s in summaries]
    cats = [set(p.items["category"]) for p in parts]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not cats[i] & cats[j]
    assert set().union(*cats) == set(silo.items["category"])
    assert sum(p.n_items for p in parts) == silo.n_items
    assert sum(len(p.interactions) for p in parts) == len(silo.interactions)
    for p in parts:
        assert set(p.interactions["item_id"]) <= set(p.items["item_id"])
    meta = json.loads((tmp_path / "out" / summaries[0].name / "silo.json").read_text())
    assert meta["scheme"] == "catalog" and meta["interactions"] == len(parts[0].interactions)


def test_impossible_requests_are_clear_errors(tmp_path, silo):
    with pytest.raises(PartitionError, match="at most 10"):
        plan(silo, 11, "region")
    with pytest.raises(PartitionError, match="categories"):
        plan(silo, 7, "catalog")
    with pytest.raises(PartitionError, match="alpha"):
        plan(silo, 3, "dirichlet", alpha=0)


def test_failed_partition_leaves_no_output(tmp_path, silo, monkeypatch):
    import simulations.partition as part

    def boom(*a, **k):
        raise RuntimeError("disk full")

    shares = plan(silo, 3, "region")
    monkeypatch.setattr(part, "summarize", boom)
    with pytest.raises(RuntimeError):
        write_partition(silo, shares, tmp_path / "out", scheme="region", seed=0)
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]
