"""The co-occurrence release: its sensitivity, its noise, its projection, its place in the score and the state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from client.ledger import PrivacyLedger
from client.merchant import Merchant
from common.cooccurrence import pair_counts, release_cooccurrence, release_top_cooccurrence
from common.model_config import ModelConfig
from common.recommender import build_recommender
from common.round import RoundConfig
from common.silo import load_silo
from common.storage import LOCAL_FILE
from common.text import item_texts


def upper(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(len(matrix), k=1)]


def test_one_user_moves_the_pair_counts_by_exactly_norm_one():
    rng = np.random.default_rng(0)
    items = np.arange(0, 40, 2)  # only even items are among the released
    histories = [rng.integers(0, 50, size=rng.integers(2, 60)) for _ in range(30)]
    newcomer = np.array([2, 4, 2, 4, 6, 5, 8, 45])
    without = pair_counts(histories, items, 50, window=2)
    with_newcomer = pair_counts([*histories, newcomer], items, 50, window=2)
    assert np.linalg.norm(with_newcomer - without) == pytest.approx(1.0)
    # the newcomer's pairs within 2 steps among even items: {2,4} three times, {4,6}, {2,6},
    # {6,8}; 5 and 45 are not among them, and 2, 2 two steps apart is no pair
    mine = with_newcomer - without
    index = {pair: k for k, pair in enumerate(zip(*np.triu_indices(len(items), k=1)))}
    slot = {int(item): s for s, item in enumerate(items)}
    expected = np.zeros_like(mine)
    for (a, b), n in {(2, 4): 3, (4, 6): 1, (2, 6): 1, (6, 8): 1}.items():
        expected[index[(slot[a], slot[b])]] = n
    assert np.allclose(mine, expected / np.linalg.norm(expected))


def test_release_is_symmetric_noisy_by_the_noise_multiplier_and_fresh_unless_seeded():
    histories = [np.array([0, 1, 2, 3]), np.array([3, 2, 5])]
    items = np.arange(300)
    exact = release_cooccurrence(histories, items, 300, 0.0, rank=0)
    assert np.allclose(upper(exact), pair_counts(histories, items, 300)) and np.allclose(exact, exact.T)
    noisy = release_cooccurrence(histories, items, 300, 2.0, rank=0)
    assert np.allclose(noisy, noisy.T) and not np.diag(noisy).any()
    assert np.std(upper(noisy) - upper(exact)) == pytest.approx(2.0, rel=0.02)
    assert not np.array_equal(noisy, release_cooccurrence(histories, items, 300, 2.0, rank=0))
    seeded = [release_cooccurrence(histories, items, 300, 2.0, rank=8, seed=3) for _ in range(2)]
    assert np.array_equal(*seeded)


def test_projection_keeps_shared_structure_and_drops_most_noise():
    # 200 users over 60 items in three taste groups: each user moves within their group
    rng = np.random.default_rng(1)
    groups = np.arange(60).reshape(3, 20)
    histories = [rng.choice(groups[u % 3], size=15) for u in range(200)]
    items = np.arange(60)
    truth = release_cooccurrence(histories, items, 60, 0.0, rank=0)
    raw = release_cooccurrence(histories, items, 60, 1.0, rank=0, seed=0)
    projected = release_cooccurrence(histories, items, 60, 1.0, rank=3, seed=0)
    assert np.linalg.norm(projected - truth) < 0.6 * np.linalg.norm(raw - truth)


def test_released_neighbours_enter_the_score_times_the_shared_weight_and_stay_local(
    tmp_path, tiny_bert, synthetic_silo
):
    silo = load_silo(synthetic_silo)
    ids, texts = list(silo.items["item_id"]), item_texts(silo.items)
    model = build_recommender(ModelConfig(base_model=str(tiny_bert), local_head="none"), ids, texts)
    with pytest.raises(ValueError, match="release that first"):
        release_top_cooccurrence(model.prior.numpy(), [np.array([0, 1])], 1.0)
    # every user goes 0 → 1 → 2: the released rows make 1 and 2 the neighbours of 0 and 1
    histories = [np.array([0, 1, 2])] * 50
    model.set_prior(np.linspace(3, 0, len(ids)))  # items 0, 1, 2 are the most popular
    assert "calibration.neighbour_weight.weight" not in model.trainable_names()
    batch = model.history_inputs([np.array([5, 0])])
    with torch.no_grad():
        before = model(**batch)
        items, matrix = release_top_cooccurrence(model.prior.numpy(), histories, 0.1, size=10, seed=0)
        assert items.tolist() == list(range(10)) and not model.has_neighbours
        model.set_neighbours(items, matrix)
        scores = model.neighbour_scores(batch["recent"])
        assert torch.allclose(model(**batch) - before, 0.25 * scores, atol=1e-5)
    assert int(scores[0].argmax()) in (1, 2)  # what followed item 0 for every user
    assert scores[0].mean().abs() < 1e-5 and scores[0].std() == pytest.approx(1.0, rel=1e-4)
    assert "calibration.neighbour_weight.weight" in model.trainable_names()
    assert "calibration.neighbour_weight.weight" in model.shared_state()
    assert not any(v.numel() in (len(ids), 100) for v in model.shared_state().values())  # no per-item tensor leaves

    model.save_local(tmp_path / LOCAL_FILE)
    keep = [i for i in range(len(ids)) if i != 1][::-1]  # another catalog: reversed, without item 1
    other = build_recommender(
        ModelConfig(base_model=str(tiny_bert), local_head="none"), [ids[i] for i in keep], [texts[i] for i in keep]
    )
    other.restore_local(tmp_path)
    assert other.has_neighbours and len(other.neighbour_items) == 9
    theirs = {ids[int(i)]: k for k, i in enumerate(model.neighbour_items)}
    ours = {other.item_ids[int(i)]: k for k, i in enumerate(other.neighbour_items)}
    a, b = ids[0], ids[2]
    assert other.neighbours[ours[a], ours[b]] == model.neighbours[theirs[a], theirs[b]]


def test_a_merchant_releases_both_once_and_pays_for_them_in_its_ledger(tmp_path, tiny_bert, synthetic_silo):
    cfg = RoundConfig.for_mode(
        "silo",
        base_model=str(tiny_bert),
        rounds=2,
        local_epochs=1,
        batch_size=16,
        epsilon=8.0,
        delta=1e-3,
        prior_noise=2.0,
        cooccurrence_noise=1.5,
    )
    merchant = Merchant(synthetic_silo, tmp_path / "state", cfg.model())
    global_arrays = {k: v.numpy() for k, v in merchant.model.shared_state().items()}
    for r in (1, 2):
        assert merchant.train_round(global_arrays, replace(cfg, round=r)).update is not None
    ledger = PrivacyLedger.open(tmp_path / "state", budget=8.0, delta=1e-3)
    assert [e.what for e in ledger.entries] == ["popularity", "cooccurrence", "train", "train"]
    assert ledger.entries[1].noise_multiplier == 1.5 and 7.0 < ledger.spent() <= 8.0
    restarted = Merchant(synthetic_silo, tmp_path / "state", cfg.model())
    restarted.set_global(global_arrays)
    assert restarted.model.has_neighbours and torch.equal(restarted.model.neighbours, merchant.model.neighbours)
