"""The popularity prior: its sensitivity, its noise, its place in the score and in the ledger."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from client.ledger import PrivacyLedger
from client.merchant import Merchant, released_table, state_path
from common.metrics import ranks_of
from common.model_config import ModelConfig
from common.popularity import (
    accountant_entry,
    check_table,
    item_counts,
    look_up,
    pool_tables,
    prior_from_counts,
    read_table,
    release_counts,
    release_prior,
    text_keys,
)
from common.recommender import build_recommender
from common.round import RoundConfig
from common.serve import best_scale, parse_scales, prior_scale_ranks, scorer
from common.silo import load_silo
from common.split import leave_one_out
from common.storage import LOCAL_FILE, load_local
from common.text import item_texts
from server.settings import ServerSettings
from simulations import federated
from simulations.federated import run_local_only
from simulations.synthetic import SyntheticSpec, make_synthetic_silo


def test_one_user_moves_the_counts_by_exactly_norm_one():
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 50, size=rng.integers(1, 40)) for _ in range(30)]
    newcomer = np.array([3, 3, 7, 9, 9, 9, 41])  # repeats count once
    without = item_counts(histories, 50)
    with_newcomer = item_counts([*histories, newcomer], 50)
    assert np.linalg.norm(with_newcomer - without) == pytest.approx(1.0)
    assert np.count_nonzero(with_newcomer - without) == 4


def test_release_adds_gaussian_noise_of_the_noise_multiplier_and_exact_counts_without():
    histories = [np.array([0, 1]), np.array([1, 2, 3])]
    exact = item_counts(histories, 20_000)
    assert np.array_equal(release_counts(histories, 20_000, 0.0), exact)
    noisy = release_counts(histories, 20_000, 2.0)
    assert np.std(noisy - exact) == pytest.approx(2.0, rel=0.03)
    # fresh noise unless seeded: whoever knows the seed can subtract it
    assert not np.array_equal(noisy, release_counts(histories, 20_000, 2.0))
    assert np.array_equal(
        release_counts(histories, 20_000, 2.0, seed=5), release_counts(histories, 20_000, 2.0, seed=5)
    )
    prior = prior_from_counts(np.array([-3.0, 0.0, np.e - 1]))
    assert prior.tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert accountant_entry(2.0) == (2.0, 1.0, 1)


def test_prior_enters_the_score_times_the_shared_weight_and_is_saved_locally(tmp_path, tiny_bert, synthetic_silo):
    silo = load_silo(synthetic_silo)
    ids, texts = list(silo.items["item_id"]), item_texts(silo.items)
    model = build_recommender(ModelConfig(base_model=str(tiny_bert), local_head="none"), ids, texts)
    batch = model.history_inputs([np.array([0, 1, 2])])
    assert "calibration.prior_weight.weight" not in model.trainable_names()  # nothing to weigh yet
    with torch.no_grad():
        before = model(**batch)
        prior = np.linspace(0, 3, len(ids)).astype(np.float32)
        model.set_prior(prior)
        model.calibration.prior_weight.weight.fill_(0.5)
        assert torch.allclose(model(**batch) - before, 0.5 * torch.as_tensor(prior)[None], atol=1e-5)
    assert "calibration.prior_weight.weight" in model.trainable_names()
    assert "calibration.prior_weight.weight" in model.shared_state()  # the weight is shared...
    assert not any(v.numel() == len(ids) for v in model.shared_state().values())  # ...no per-item tensor is

    model.save_local(tmp_path / LOCAL_FILE)  # no item head, but the prior stays in the silo's state
    other = build_recommender(ModelConfig(base_model=str(tiny_bert), local_head="none"), ids[::-1], texts[::-1])
    assert not other.has_prior
    other.restore_local(tmp_path)
    assert np.allclose(other.prior.numpy(), prior[::-1])  # aligned by item id
    with pytest.raises(ValueError, match="one per catalog item"):
        other.set_prior(np.zeros(3))


def test_a_merchant_releases_once_and_pays_for_it_in_its_ledger(tmp_path, tiny_bert, synthetic_silo):
    cfg = RoundConfig.for_mode(
        "silo",
        base_model=str(tiny_bert),
        rounds=2,
        local_epochs=1,
        batch_size=16,
        epsilon=8.0,
        delta=1e-3,
        prior_noise=1.0,
    )
    merchant = Merchant(synthetic_silo, tmp_path / "state", cfg.model())
    global_arrays = {k: v.numpy() for k, v in merchant.model.shared_state().items()}
    for r in (1, 2):
        outcome = merchant.train_round(global_arrays, replace(cfg, round=r))
        assert outcome.update is not None
    ledger = PrivacyLedger.open(tmp_path / "state", budget=8.0, delta=1e-3)
    assert [e.what for e in ledger.entries] == ["popularity", "train", "train"]
    assert ledger.entries[0].noise_multiplier == 1.0 and ledger.entries[0].sample_rate == 1.0
    assert 7.0 < ledger.spent() <= 8.0  # the rounds were planned around the release
    assert outcome.metrics["epsilon-total"] == pytest.approx(ledger.spent())
    # the prior is in the state folder, and a restarted merchant serves with the same one
    restarted = Merchant(synthetic_silo, tmp_path / "state", cfg.model())
    restarted.set_global(global_arrays)
    assert restarted.model.has_prior and torch.equal(restarted.model.prior, merchant.model.prior)


def test_release_prior_is_a_pure_release_the_model_is_then_given(tiny_bert, synthetic_silo):
    silo = load_silo(synthetic_silo)
    model = build_recommender(
        ModelConfig(base_model=str(tiny_bert)), list(silo.items["item_id"]), item_texts(silo.items)
    )
    histories = [np.array([0, 1, 2]), np.array([2, 3])]
    counts = release_prior(histories, silo.n_items, 1.5, seed=0)
    assert counts.shape == (silo.n_items,) and not model.has_prior  # the release touches no model
    assert accountant_entry(1.5) == (1.5, 1.0, 1)
    model.set_prior(prior_from_counts(counts))
    assert model.has_prior
    with pytest.raises(ValueError, match="needs noise"):
        release_prior(histories, silo.n_items, 0.0)


def test_local_only_merchants_pay_for_the_same_prior_from_the_same_budget(tmp_path, tiny_bert):
    silos = tmp_path / "silos"
    for name, seed in (("a", 1), ("b", 2)):
        make_synthetic_silo(silos / name, SyntheticSpec(users=40, seed=seed))
    cfg = RoundConfig.for_mode(
        "silo", base_model=str(tiny_bert), local_epochs=1, batch_size=16, epsilon=8.0, delta=1e-3, threads=1
    )
    report = run_local_only(
        silos, ServerSettings(rounds=2, out_dir=str(tmp_path / "run"), round=cfg), tmp_path / "run", log=lambda *_: None
    )
    assert report["test"]["users"] == 80 and 0 < report["epsilon_max"] <= 8.0
    for m in report[
        "per_merchant"
    ]:  # each chose its prior's weight on its own validation users, and kept the ranks as trained
        assert m["prior_scale"] in parse_scales(ServerSettings.prior_scales) and len(m["test_ranks_learned"]) == len(
            m["test_ranks"]
        )
    for name in ("a", "b"):
        ledger = PrivacyLedger.open(tmp_path / "run" / "local-only" / name, budget=8.0, delta=1e-3)
        assert [e.what for e in ledger.entries] == ["popularity", "train"] and ledger.spent() <= 8.0


def test_local_only_merchants_keep_the_release_they_made_to_federate(tmp_path, tiny_bert, monkeypatch):
    # Common random numbers: alone, a merchant scores with the very prior it released to federate,
    # and its ledger pays for that release (here at noise 2, not the baseline's own 1); not with
    # the pooled counts it federated with, which only federating gives.
    silos = tmp_path / "silos"
    for name, seed in (("a", 1), ("b", 2)):
        make_synthetic_silo(silos / name, SyntheticSpec(users=40, seed=seed))
    cfg = RoundConfig.for_mode(
        "silo", base_model=str(tiny_bert), local_epochs=1, batch_size=16, epsilon=8.0, delta=1e-3, threads=1
    )
    federating = Merchant(silos / "a", state_path({}, silos / "a"), cfg.model())
    federating.release_statistics(replace(cfg, prior_noise=2.0), federating.ledger(cfg, None))
    released, _ = load_local(state_path({}, silos / "a") / LOCAL_FILE)
    table = released_table(state_path({}, silos / "a"))
    federating.use_pooled_popularity({"keys": table["keys"], "counts": 3 * np.abs(table["counts"]) + 5})
    assert not torch.equal(load_local(state_path({}, silos / "a") / LOCAL_FILE)[0]["prior"], released["prior"])
    priors = []
    real_train = federated.train
    monkeypatch.setattr(
        federated, "train", lambda model, *a, **kw: (priors.append(model.prior.clone()), real_train(model, *a, **kw))[1]
    )

    run_local_only(
        silos, ServerSettings(rounds=1, out_dir=str(tmp_path / "run"), round=cfg), tmp_path / "run", log=lambda *_: None
    )
    assert torch.equal(priors[0], released["prior"]) and priors[1].any()
    for name, noise in (("a", 2.0), ("b", 1.0)):  # b never federated: it releases afresh, at its own noise
        entries = PrivacyLedger.open(tmp_path / "run" / "local-only" / name, budget=8.0, delta=1e-3).entries
        assert [(e.what, e.noise_multiplier) for e in entries] == [
            ("popularity", noise),
            ("train", entries[1].noise_multiplier),
        ]


def test_item_texts_name_an_item_alike_at_every_merchant():
    keys = text_keys(["Toy Story (1995); Animation", "Heat (1995); Action", "Toy Story (1995); Animation"])
    assert keys.dtype == np.uint64 and keys[0] == keys[2] and keys[0] != keys[1]
    assert np.array_equal(
        text_keys(["Heat (1995); Action"]), keys[1:2]
    )  # not salted: another merchant computes the same


def test_pooled_counts_are_the_tables_summed_by_item_text():
    a, b, c, d = text_keys(["a", "b", "c", "d"])
    shop = (np.array([a, b, c], np.uint64), np.array([1.0, 2.0, -0.5]))
    other = (np.array([c, b], np.uint64), np.array([4.0, 0.25], np.float32))  # another order, another dtype
    pooled = pool_tables([shop, other])
    assert np.allclose(look_up(pooled, shop[0]), [1.0, 2.25, 3.5])
    assert np.allclose(look_up(pooled, np.array([d, c], np.uint64)), [0.0, 3.5])  # an item no table held: 0
    assert np.allclose(look_up(pool_tables([]), shop[0]), 0.0)


@pytest.mark.parametrize(
    "keys, counts, message",
    [
        (np.arange(3, dtype=np.int64), np.ones(3), "uint64"),
        (np.arange(3, dtype=np.uint64), np.ones(2), "one per key"),
        (np.arange(3, dtype=np.uint64), np.array([1.0, np.nan, 0.0]), "finite"),
        (np.arange(3, dtype=np.uint64), np.ones(3, np.int32), "floats"),
    ],
)
def test_a_table_that_is_not_one_is_refused(keys, counts, message):
    with pytest.raises(ValueError, match=message):
        check_table(keys, counts)
    with pytest.raises(ValueError, match=message):
        read_table({"keys": keys, "counts": counts})


def test_a_table_holds_keys_and_counts_and_nothing_else():
    keys = text_keys(["a", "b"])
    assert read_table({"keys": keys, "counts": np.ones(2)})[0] is keys
    for table in ({"keys": keys}, {"keys": keys, "counts": np.ones(2), "users": np.ones(1)}):
        with pytest.raises(ValueError, match="holds keys and counts"):
            read_table(table)


def test_a_merchant_shares_its_release_once_and_scores_with_the_pooled_counts(tmp_path, tiny_bert, synthetic_silo):
    cfg = RoundConfig.for_mode(
        "silo",
        base_model=str(tiny_bert),
        rounds=1,
        local_epochs=1,
        batch_size=16,
        epsilon=8.0,
        delta=1e-3,
        prior_noise=1.0,
    )
    merchant = Merchant(synthetic_silo, tmp_path / "state", cfg.model())
    table, reason = merchant.popularity_table(cfg)
    again, _ = merchant.popularity_table(cfg)  # asked twice (a restarted coordinator): the same release
    assert (
        reason == ""
        and np.array_equal(table["counts"], again["counts"])
        and np.array_equal(table["keys"], merchant.item_keys)
    )
    assert np.allclose(merchant.model.prior.numpy(), prior_from_counts(table["counts"]))
    others = 10.0 * np.arange(len(table["keys"]))
    merchant.use_pooled_popularity(
        {"keys": table["keys"][::-1].copy(), "counts": (table["counts"] + others)[::-1].copy()}
    )
    global_arrays = {k: v.numpy() for k, v in merchant.model.shared_state().items()}
    assert merchant.train_round(global_arrays, cfg).update is not None
    assert np.allclose(merchant.model.prior.numpy(), prior_from_counts(table["counts"] + others))
    ledger = PrivacyLedger.open(tmp_path / "state", budget=8.0, delta=1e-3)
    assert [e.what for e in ledger.entries] == ["popularity", "train"]  # sharing and pooling cost no ε
    with pytest.raises(ValueError, match="finite"):
        merchant.use_pooled_popularity({"keys": table["keys"], "counts": np.full(len(table["keys"]), np.inf)})
    assert merchant.popularity_table(replace(cfg, no_dp=True)) == (None, "this run releases no popularity")
    spent = Merchant(synthetic_silo, tmp_path / "spent", cfg.model())
    PrivacyLedger.open(tmp_path / "spent", budget=8.0, delta=1e-3).record(
        run="earlier", round=1, noise_multiplier=0.5, sample_rate=1.0, steps=200
    )
    assert spent.popularity_table(cfg) == (None, "the ε budget left cannot pay for the popularity release")


def test_scaling_the_prior_weight_ranks_as_a_model_with_that_weight(tiny_bert, synthetic_silo):
    silo = load_silo(synthetic_silo)
    split = leave_one_out(silo.interactions, silo.n_items)
    model = build_recommender(
        ModelConfig(base_model=str(tiny_bert), local_head="none"), list(silo.items["item_id"]), item_texts(silo.items)
    )
    model.set_prior(prior_from_counts(item_counts(split.train, silo.n_items) * 4))
    model.calibration.prior_weight.weight.data.fill_(0.8)
    ranks = prior_scale_ranks(
        model, split.valid, (1.0, 0.5, 1.0, 0.0), batch_size=7
    )  # batches need not divide the users
    assert list(ranks) == [1.0, 0.5, 0.0] and np.array_equal(ranks[1.0], ranks_of(scorer(model), split.valid))
    model.calibration.prior_weight.weight.data.fill_(0.4)
    assert np.array_equal(ranks[0.5], ranks_of(scorer(model), split.valid))
    assert not np.array_equal(ranks[0.0], ranks[1.0])  # the prior moves the ranks here


def test_the_first_of_equally_good_prior_scales_is_chosen():
    assert best_scale({1.0: 0.05, 0.5: 0.06, 0.25: 0.06}) == 0.5
    assert best_scale({1.0: 0.0, 0.5: 0.0}) == 1.0  # a merchant whose validation cannot tell keeps the learned weight
    assert parse_scales("1, 0.5,") == (1.0, 0.5) and parse_scales("") == ()
    for bad in ("1,x", "-1", "nan"):
        with pytest.raises(ValueError, match="prior scales"):
            parse_scales(bad)
