"""A merchant node's configuration: parsed once, checked, and a budget that keeps a node in DP rounds only."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.node_config import NodeConfig, NodeConfigError


def test_paths_default_beside_the_silo_and_a_simulation_picks_its_partition(tmp_path):
    node = NodeConfig.parse({"data-path": str(tmp_path / "shop")})
    assert node.silo() == tmp_path / "shop" and node.state() == tmp_path / "shop" / ".silorec-state"
    assert node.cache() == tmp_path / "shop" / ".silorec-state" / "cache" and node.budget is None
    for name in ("b", "a", ".hidden"):
        (tmp_path / "silos" / name).mkdir(parents=True)
    sim = NodeConfig.parse({"partition-id": 1})
    assert (
        sim.silo(str(tmp_path / "silos")) == tmp_path / "silos" / "b"
        and sim.cache(str(tmp_path / "silos")) == tmp_path / "cache"
    )
    with pytest.raises(NodeConfigError, match="no data-path"):
        NodeConfig.parse({}).silo()


def test_a_budget_must_be_a_positive_number_and_keeps_the_node_out_of_non_private_rounds():
    for bad in ("eight", "-1", "0", "nan", "inf"):
        with pytest.raises(NodeConfigError, match="budget"):
            NodeConfig.parse({"budget": bad})
    node = NodeConfig.parse({"budget": "6.5"})
    assert node.budget == 6.5
    node.check_privacy(True, "a round")
    with pytest.raises(NodeConfigError, match="takes part only in DP rounds"):
        node.check_privacy(False, "a round")
    NodeConfig.parse({"no-dp": "true"}).check_privacy(
        False, "a round"
    )  # opted in, loudly, at `silorec-client start --no-dp`
    NodeConfig.parse({}).check_privacy(False, "a round")  # a simulation: the researcher sets both sides
    with pytest.raises(NodeConfigError, match="either"):
        NodeConfig.parse({"budget": "8", "no-dp": "true"})
    assert NodeConfig.parse({"data-path": "x", "signing-key": "k.sign.key"}).signing_key == Path("k.sign.key")
