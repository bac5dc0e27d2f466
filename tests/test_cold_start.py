from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from click.testing import CliRunner

from common.silo import load_silo
from common.split import EvalCase
from simulations.cold_start import item_knn_scorer, new_items, write_without

LATE = 10**7  # seconds: after every other interaction of the synthetic silo


def with_late_items(silo_dir, every=6):
    """Make every `every`-th item a late arrival: all of its interactions move after everyone else's."""
    inter = pd.read_csv(silo_dir / "interactions.csv", dtype=str)
    items = pd.read_csv(silo_dir / "items.csv", dtype=str)
    late = set(items["item_id"].iloc[::every])
    stamps = inter["timestamp"].astype(np.int64)
    inter["timestamp"] = np.where(inter["item_id"].isin(late), stamps + LATE, stamps).astype(str)
    inter.to_csv(silo_dir / "interactions.csv", index=False)
    return silo_dir, late


def test_new_items_are_those_first_seen_late_and_the_before_silo_has_no_trace_of_them(tmp_path, synthetic_silo):
    _, late = with_late_items(synthetic_silo)
    silo = load_silo(synthetic_silo)
    new = new_items(silo, 0.3)
    assert set(silo.items["item_id"].iloc[new]) == late
    stamps = silo.interactions["timestamp"].to_numpy()
    cutoff = np.quantile(stamps, 0.7)
    first = silo.interactions.groupby("item")["timestamp"].min()
    assert set(new) == {i for i, t in first.items() if t >= cutoff} and 0 < len(new) < silo.n_items
    write_without(silo, new, tmp_path / "before")
    before = load_silo(tmp_path / "before")
    gone = set(silo.items["item_id"].iloc[new])
    assert not gone & set(before.items["item_id"]) and not gone & set(before.interactions["item_id"])
    assert len(before.interactions) == int((~silo.interactions["item"].isin(new)).sum())


def test_item_knn_scores_by_cosine_of_co_interactions_and_cannot_score_an_unseen_item():
    train = [np.array([0, 1]), np.array([0, 1, 2]), np.array([2])]
    score = item_knn_scorer(train, 4)
    row = score([EvalCase("u", np.array([0]), 3)])[0]
    # item 0 and 1: both in users 0 and 1 → cosine 1; item 0 and 2: user 1 only → 1/(√2·√2)
    assert torch.allclose(row, torch.tensor([0.0, 1.0, 0.5, 0.0]))


def test_cold_start_trains_without_the_new_items_and_scores_them(tmp_path, tiny_bert, synthetic_silo):
    from simulations.cli import main as sim

    with_late_items(synthetic_silo)
    out = tmp_path / "cold"
    args = ["cold-start", "--data", str(synthetic_silo), "--out", str(out), "--share", "0.3", "--cache", str(tmp_path)]
    args += ["--", "--base-model", str(tiny_bert), "--epochs", "1", "--no-dp"]
    done = CliRunner().invoke(sim, args)
    assert done.exit_code == 0, done.output
    report = json.loads((out / "cold_start.json").read_text())
    n_new = report["test_targets"]["new"]
    assert n_new > 0 and report["new"]["silorec"]["users"] == n_new
    assert report["new"]["MostPop"]["hr@10"] == 0 and report["new"]["ItemKNN"]["hr@10"] == 0
    # the baselines rank a never-seen item last; silorec reads its text and ranks it ahead of that
    assert report["new"]["silorec"]["median_rank"] < report["new"]["MostPop"]["median_rank"]
    trained = pd.read_csv(out / "before" / "items.csv", dtype=str)
    assert len(trained) == report["catalog"] - report["new_items"]
    assert "new items (never trained on)" in done.output
    again = CliRunner().invoke(sim, args)
    assert again.exit_code != 0 and "not empty" in again.output
    rescored = CliRunner().invoke(sim, [*args[: args.index("--")], "--rescore"])
    assert rescored.exit_code == 0, rescored.output
    assert json.loads((out / "cold_start.previous.json").read_text()) == report
    assert json.loads((out / "cold_start.json").read_text())["new"]["MostPop"] == report["new"]["MostPop"]
