"""The one-run audit's arithmetic, against values worked by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from common.audit import epsilon_lower_bound, p_value
from simulations.cli import main
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


def test_at_epsilon_zero_without_delta_the_p_value_is_a_fair_coins_tail():
    # 10 right out of 10 fair coins: 1/1024; 9 or more: 11/1024
    assert p_value(10, 10, 10, 0.0, 0.0) == pytest.approx(1 / 1024)
    assert p_value(10, 10, 9, 0.0, 0.0) == pytest.approx(11 / 1024)
    assert p_value(100, 10, 0, 3.0, 0.0) == pytest.approx(1.0)  # zero right is always possible


def test_the_delta_term_is_twice_m_delta_times_the_largest_averaged_tail():
    # m = r = v = 10, ε = 0: max over i of P[10 > X ≥ 10 − i]/i is at i = 6, (10+45+120+210+252+210)/1024/6
    alpha = (10 + 45 + 120 + 210 + 252 + 210) / 1024 / 6
    assert p_value(10, 10, 10, 0.0, 1e-3) == pytest.approx(1 / 1024 + 2 * 10 * 1e-3 * alpha)


def test_the_lower_bound_is_where_the_p_value_reaches_the_level():
    # 10 right out of 10 with δ = 0: q^10 < 0.05, so q < 0.05^0.1 and ε < log(q / (1 − q)) = 1.0517…
    q = 0.05**0.1
    assert epsilon_lower_bound(10, 10, 10, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert epsilon_lower_bound(1000, 10, 5, 0.0) == 0.0  # chance-level guesses prove nothing
    # more guesses right, a higher bound; δ only lowers it
    assert epsilon_lower_bound(1000, 100, 90, 0.0) > epsilon_lower_bound(1000, 100, 80, 0.0) > 0
    assert epsilon_lower_bound(1000, 100, 90, 1e-5) <= epsilon_lower_bound(1000, 100, 90, 0.0)
    bound = epsilon_lower_bound(1000, 100, 90, 1e-5)
    assert p_value(1000, 100, 90, bound, 1e-5) < 0.05 <= p_value(1000, 100, 90, bound + 1e-4, 1e-5)


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError, match="correct"):
        p_value(10, 5, 6, 1.0, 0.0)


def test_a_tiny_audit_plants_trains_scores_and_bounds_from_the_released_model(tmp_path, tiny_bert):
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=60, seed=2))
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        main,
        ["audit", "--data", str(data), "--out", str(out), "--merchants", "3", "--epsilon", "8", "--delta", "1e-3"]
        + ["--canaries", "20", "--guesses", "4", "--", "--rounds", "1", "--batch-size", "16"]
        + ["--base-model", str(tiny_bert), "--eval-every", "1"],
    )
    assert result.exit_code == 0, result.output + (out / "training.log").read_text()[-3000:]
    report = json.loads((out / "audit.json").read_text())
    canaries = report["per_canary"]
    planted = set(pd.read_csv(out / "data" / "interactions.csv", dtype=str)["user_id"])
    # exactly the canaries whose coin said so were trained on
    assert {c["user_id"] for c in canaries if c["included"]} == {u for u in planted if u.startswith("canary-")}
    assert report["included"] == sum(c["included"] for c in canaries) and report["canaries"] == 20
    guessed = [c for c in canaries if c["guess"] is not None]
    assert len(guessed) == report["guesses"] == 8 and all(np.isfinite(c["score"]) for c in canaries)
    ins = min(c["score"] for c in guessed if c["guess"] == "in")
    assert all(c["score"] <= ins for c in canaries if c["guess"] != "in")  # "in" for the highest scores
    right = sum((c["guess"] == "in") == c["included"] for c in guessed)
    assert report["correct"] == right
    assert report["empirical_epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(20, 8, right, 1e-3))
    assert (
        7.0 < report["claimed_epsilon"] <= 8.0 and report["empirical_epsilon_lower_bound"] <= report["claimed_epsilon"]
    )
    assert report["score"].startswith("the released popularity prior")  # federation mode releases popularity
    assert "## Privacy audit" in (out / "run" / "adapter" / "README.md").read_text()
    assert "empirical lower bound" in result.output
    # re-scored from the same released model: the same figures, the earlier report kept, one card section
    again = CliRunner().invoke(main, ["audit-rescore", str(out)])
    assert again.exit_code == 0, again.output
    rescored = json.loads((out / "audit.json").read_text())
    assert [c["score"] for c in rescored["per_canary"]] == pytest.approx([c["score"] for c in canaries])
    assert json.loads((out / "audit.previous.json").read_text()) == report
    assert (out / "run" / "adapter" / "README.md").read_text().count("## Privacy audit") == 1


def test_a_non_private_federation_is_caught_by_the_audit(tmp_path, tiny_bert):
    """The power check: without DP the pooled popularity is exact, so every canary's product gives its coin away."""
    data = make_synthetic_silo(tmp_path / "data", SyntheticSpec(users=60, seed=3))
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        main,
        ["audit", "--data", str(data), "--out", str(out), "--merchants", "3", "--no-dp", "--canaries", "20"]
        + ["--guesses", "4", "--", "--rounds", "1", "--batch-size", "16", "--base-model", str(tiny_bert)]
        + ["--eval-every", "1"],
    )
    assert result.exit_code == 0, result.output + (out / "training.log").read_text()[-3000:]
    report = json.loads((out / "audit.json").read_text())
    assert report["claimed_epsilon"] is None and report["score"].startswith("the released popularity prior")
    planted = pd.read_csv(out / "data" / "items.csv", dtype=str)
    products = {c["target_id"] for c in report["per_canary"]}
    assert len(products) == 20 and products <= set(planted["item_id"])  # every product is listed, planted or not
    for c in report["per_canary"]:  # an unplanted canary's product has no buyer at all
        assert (c["released_prior"] > 0) == c["included"], c
    assert report["correct"] == report["guesses"] == 8 and report["release_auc"] == 1.0
    assert report["empirical_epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(20, 8, 8, report["delta"]))
    assert report["empirical_epsilon_lower_bound"] > 0.5


def test_the_association_score_compares_a_target_under_its_own_history_with_the_others(tiny_bert, synthetic_silo):
    import torch

    from common.model_config import ModelConfig
    from common.recommender import build_recommender
    from common.serve import score_histories
    from common.silo import load_silo
    from common.text import item_texts
    from simulations.audit import Canary, association

    silo = load_silo(synthetic_silo)
    model = build_recommender(
        ModelConfig(base_model=str(tiny_bert), local_head="bias"), list(silo.items["item_id"]), item_texts(silo.items)
    )
    canaries = [Canary(f"c{i}", (i, i + 10, i + 20), 30 + i, True) for i in range(4)]
    got = association(model, canaries)
    log_p = torch.log_softmax(score_histories(model, [np.array(c.history) for c in canaries]).double(), dim=1)
    by_hand = log_p[2, 32] - (log_p[0, 32] + log_p[1, 32] + log_p[3, 32]) / 3
    assert got[2] == pytest.approx(float(by_hand))
    # what training does to an item for everyone (its bias) all but cancels, where the plain log p moves with it
    with torch.no_grad():
        model.head.bias.weight[32] += 5.0
    after = torch.log_softmax(score_histories(model, [np.array(c.history) for c in canaries]).double(), dim=1)
    raw = float(after[2, 32] - log_p[2, 32])
    assert raw > 3 and abs(association(model, canaries)[2] - got[2]) < 0.02 * raw


def test_the_claim_of_a_silo_mode_run_is_its_weakest_merchants():
    from simulations.audit import claimed

    silo = {
        "privacy": {"mode": "silo", "dp": True},
        "epsilon_max": 7.9,
        "merchants": [{"delta": 1e-3}, {"delta": 5e-3}],
    }
    assert claimed(silo) == (7.9, 5e-3)
    federation = {"privacy": {"mode": "federation", "epsilon": 7.96, "delta": 1e-4}}
    assert claimed(federation) == (7.96, 1e-4)
    assert claimed({"privacy": {"mode": "federation", "dp": False}}) == (float("inf"), 0.0)
