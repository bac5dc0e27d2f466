"""The privacy-mode benchmark: what it runs for each arm, and how it reads their figures back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import SilorecError
from common.metrics import save_ranks
from simulations.benchmark import BenchmarkSpec, command, parse_options, summarize, table


def test_each_arm_runs_its_own_command_with_the_shared_privacy_settings(tmp_path):
    spec = BenchmarkSpec(
        data=Path("d"), out=tmp_path, options=parse_options(["federation=--rounds 200", "federation=--eval-every 50"])
    )
    fed = command(spec, "federation", tmp_path / "f")
    assert (
        fed[-4:] == ["--rounds", "200", "--eval-every", "50"]
        and "--privacy" in fed
        and fed[fed.index("--privacy") + 1] == "federation"
    )
    assert fed[fed.index("--epsilon") + 1] == "8" and fed[fed.index("--delta") + 1] == "0.0001"
    assert "central" in command(spec, "central-dp", tmp_path / "c") and "--epsilon" in command(
        spec, "central-dp", tmp_path / "c"
    )
    assert "--epsilon" not in command(spec, "central", tmp_path / "c") and "--no-dp" in command(
        spec, "central", tmp_path / "c"
    )
    with pytest.raises(SilorecError, match="ARM=OPTIONS"):
        parse_options(["quantum=--x"])


def test_the_summary_averages_draws_and_pairs_the_arms_by_user(tmp_path):
    spec = BenchmarkSpec(data=Path("d"), out=tmp_path, draws=2, arms=("federation", "central-dp"))
    users = [f"u{i}" for i in range(50)]
    for arm, rank in (("federation", 1), ("central-dp", 30)):
        for draw in (1, 2):
            folder = tmp_path / f"{arm}-{draw}"
            folder.mkdir()
            save_ranks(folder, {"valid": dict.fromkeys(users, rank), "test": dict.fromkeys(users, rank)}, model=arm)
            metrics = {"test": {"ndcg@10": 0.1 * draw, "hr@10": 0.2}}
            if arm == "federation":
                metrics |= {"privacy": {"epsilon": 7.9}, "most_pop_local": {"ndcg@10": 0.04, "hr@10": 0.08}}
                lines = [
                    {"round": 0, "valid": {"ndcg@10": 0.07}},
                    {"round": 1, "seconds": 10.0, "secagg": {"seconds": {"setup": 1.0, "collect_masked_vectors": 8.0}}},
                    {"round": 2, "seconds": 20.0, "valid": {"ndcg@10": 0.09}, "secagg": {"seconds": {}}},
                ]
                (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
                for silo, seconds in (
                    ("a", 12.0),
                    ("b", 2.0),
                ):  # what each merchant keeps of its own compute, per round
                    state = folder / "silos" / silo / ".silorec-state"
                    state.mkdir(parents=True)
                    (state / "timing.jsonl").write_text(
                        "".join(json.dumps({"run": "r", "round": r, "seconds": seconds}) + "\n" for r in (1, 2))
                    )
            else:
                metrics |= {
                    "valid": {"ndcg@10": 0.08},
                    "epsilon": 8.0,
                    "most_pop": {"test": {"ndcg@10": 0.04, "hr@10": 0.08}},
                }
            (folder / "metrics.json").write_text(json.dumps(metrics))
    summary = summarize(spec, {"federation-1": 60.0})
    fed = summary["arms"]["federation"]
    assert fed["test_ndcg@10"] == [0.1, 0.2] and fed["valid_ndcg@10"] == [0.09, 0.09] and fed["epsilon"] == [7.9, 7.9]
    assert fed["rounds"][0] == pytest.approx(
        {
            "valid_round0": 0.07,
            "valid_last": 0.09,
            "round_seconds": 10.0,
            "secagg_seconds": 1.0,
            "merchant_seconds_sum": 14.0,
            "merchant_seconds_max": 12.0,
        }
    )
    assert summary["paired"]["federation − central-dp"]["test"]["difference"] == pytest.approx(1.0)  # rank 1 against 30
    text = "\n".join(table(summary))
    assert "| federation | 0.1500 (0.1000, 0.2000) |" in text and "| federation − central-dp | test | +1.0000" in text
