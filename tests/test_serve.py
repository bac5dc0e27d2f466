"""What a merchant serves: `common.serve.SiloRecommender` over a saved adapter and a silo."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from common.encoder import cache_path, read_cache
from common.model_config import ModelConfig
from common.recommender import build_recommender
from common.serve import SiloRecommender, UnknownError, score_histories
from common.silo import load_silo
from common.text import item_texts


def saved_adapter(folder, tiny_bert, silo_path, *, seed=0):
    """An adapter over the silo's catalog whose LoRA B is random, so the adapter changes what the user tower says."""
    silo = load_silo(silo_path)
    model = build_recommender(
        ModelConfig(base_model=str(tiny_bert)), list(silo.items["item_id"]), item_texts(silo.items)
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.user_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save(folder)
    return folder


@pytest.fixture
def served(tmp_path, tiny_bert, synthetic_silo):
    adapter = saved_adapter(tmp_path / "adapter", tiny_bert, synthetic_silo)
    return SiloRecommender.load(adapter, synthetic_silo, cache_dir=tmp_path / "cache")


def test_a_user_gets_k_items_never_from_their_history_unless_repeats(served):
    user = served.users[0]
    seen = {served.model.item_ids[i] for i in served.history(user)}
    picks = served.recommend_user(user, k=7)
    assert len(picks) == 7 and not {p.item_id for p in picks} & seen
    assert [p.score for p in picks] == sorted((p.score for p in picks), reverse=True)
    scores = score_histories(served.model, [served.history(user)])[0]
    assert np.isclose(
        picks[0].score, max(float(scores[i]) for i in range(len(scores)) if served.model.item_ids[i] not in seen)
    )
    everything = served.recommend_user(user, k=served.n_items, repeats=True)
    assert len(everything) == served.n_items and seen <= {p.item_id for p in everything}


def test_a_live_session_of_the_same_items_is_scored_like_the_user(served):
    user = served.users[3]
    history = [served.model.item_ids[i] for i in served.history(user)]
    assert served.recommend(history, k=5) == served.recommend_user(user, k=5)
    # a short session is a different question: its answer differs from the whole history's
    assert served.recommend(history[-1:], k=5) != served.recommend_user(user, k=5)


def test_unknown_ids_name_the_field(served):
    with pytest.raises(UnknownError, match="user 'nobody'") as e:
        served.recommend_user("nobody")
    assert e.value.field == "user"
    with pytest.raises(UnknownError, match="item 'no-such-item'") as e:
        served.recommend([served.model.item_ids[0], "no-such-item"])
    assert e.value.field == "items"
    with pytest.raises(UnknownError) as e:
        served.similar("no-such-item")
    assert e.value.field == "item_id"


def test_export_is_every_users_top_k_as_served_one_by_one(served):
    frame = served.export(4, batch_size=7, progress=False)
    assert list(frame.columns) == ["user_id", "rank", "item_id", "title", "score"]
    assert len(frame) == 4 * len(served.users) and frame["user_id"].nunique() == len(served.users)
    for user in served.users[:: len(served.users) // 5]:
        rows = frame[frame["user_id"] == user]
        one = served.recommend_user(user, k=4)
        assert list(rows["item_id"]) == [p.item_id for p in one] and list(rows["rank"]) == [1, 2, 3, 4]
        assert np.allclose(rows["score"], [p.score for p in one], atol=1e-5)
    titles = dict(zip(served.silo.items["item_id"], served.silo.items["title"]))
    assert (frame["title"] == frame["item_id"].map(titles)).all()


def test_search_reads_the_item_tower_not_the_adapter(served):
    # the adapter's LoRA B is random: a query encoded through it would not find the item's own text first
    texts = item_texts(served.silo.items)
    for i in (0, 11, 30):
        best = served.search(texts[i], k=3)[0]
        assert best.item_id == served.silo.items["item_id"][i] and best.score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="some text"):
        served.search("   ")


def test_similar_items_are_the_nearest_vectors_without_the_item_itself(served):
    item = served.model.item_ids[5]
    picks = served.similar(item, k=4)
    cosine = served.model.item_vectors @ served.model.item_vectors[5]
    cosine[5] = -2
    assert item not in {p.item_id for p in picks}
    assert [p.item_id for p in picks] == [served.model.item_ids[i] for i in torch.topk(cosine, 4).indices]


def test_a_new_product_is_served_at_once_and_only_its_vector_is_computed(served, synthetic_silo):
    cache = cache_path(served._cache_dir, served.model.cfg)
    assert served.refresh() == 0  # nothing changed
    before = len(read_cache(cache))
    vectors = served.model.item_vectors.clone()
    items = pd.read_csv(synthetic_silo / "items.csv", dtype=str, keep_default_na=False)
    new = items.iloc[[0]].assign(item_id="brand-new", title="deluxe acme guitar 7")
    removed = items["item_id"].iloc[1]
    pd.concat([items.iloc[[0]], items.iloc[2:], new]).to_csv(synthetic_silo / "items.csv", index=False)
    inter = pd.read_csv(synthetic_silo / "interactions.csv", dtype=str)
    inter = inter[inter["item_id"] != removed]
    user = inter["user_id"].iloc[0]
    last = str(int(inter["timestamp"].astype(np.int64).max()) + 1)
    inter = pd.concat([inter, pd.DataFrame([{"user_id": user, "item_id": "brand-new", "timestamp": last}])])
    inter.to_csv(synthetic_silo / "interactions.csv", index=False)

    assert served.refresh() == 1
    assert len(read_cache(cache)) == before + 1  # one encoding, not the catalog's
    assert torch.equal(served.model.item_vectors[: len(vectors)], vectors)
    assert served.search("deluxe acme guitar 7", k=1)[0].item_id == "brand-new"
    everything = {p.item_id for p in served.recommend([items["item_id"].iloc[0]], k=1000)}
    assert "brand-new" in everything and removed not in everything
    assert served.model.item_ids[served.history(user)[-1]] == "brand-new"  # the new event joined the history
    assert len(served.recommend_user(user, k=3)) == 3


def test_an_edited_product_is_re_encoded_and_an_unreadable_silo_leaves_the_last_good_one(served, synthetic_silo):
    items = pd.read_csv(synthetic_silo / "items.csv", dtype=str, keep_default_na=False)
    item = items["item_id"].iloc[4]
    before = served.model.item_vectors[4].clone()
    items.loc[4, "title"] = "sturdy orbit kettle 3"
    items.to_csv(synthetic_silo / "items.csv", index=False)
    assert served.refresh() == 1
    assert not torch.allclose(served.model.item_vectors[4], before)
    assert served.search(item_texts(items)[4], k=1)[0].item_id == item
    (synthetic_silo / "items.csv").write_text("item_id,title\nx\n")  # half written
    from common.errors import SilorecError

    with pytest.raises(SilorecError):
        served.refresh()
    assert served.n_items == len(items) and served.search("sturdy orbit kettle 3", k=1)[0].item_id == item


def test_recommend_all_writes_every_users_top_k_once(tmp_path, tiny_bert, synthetic_silo):
    from click.testing import CliRunner

    from client.cli import main as client

    adapter = saved_adapter(tmp_path / "adapter", tiny_bert, synthetic_silo)
    args = ["recommend", "--adapter", str(adapter), "--data", str(synthetic_silo), "--cache", str(tmp_path / "c")]
    out = tmp_path / "recs.parquet"
    done = CliRunner().invoke(client, [*args, "--all", "-k", "3", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "users/s" in done.output
    frame = pd.read_parquet(out)
    served = SiloRecommender.load(adapter, synthetic_silo)
    assert len(frame) == 3 * len(served.users)
    user = served.users[-1]
    assert list(frame[frame["user_id"] == user]["item_id"]) == [p.item_id for p in served.recommend_user(user, 3)]
    again = CliRunner().invoke(client, [*args, "--all", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    assert pd.read_parquet(out).equals(frame)  # untouched
    for wrong in (["--all"], ["--user", user, "--all", "--out", str(out)], ["--all", "--out", str(tmp_path / "r.txt")]):
        assert CliRunner().invoke(client, [*args, *wrong]).exit_code == 2
    csv = CliRunner().invoke(client, [*args, "--all", "--repeats", "-k", "48", "--out", str(tmp_path / "r.csv")])
    assert csv.exit_code == 0, csv.output
    assert len(pd.read_csv(tmp_path / "r.csv")) == 48 * len(served.users)  # with repeats, the whole catalog


def test_a_federation_adapter_is_served_with_the_merchants_local_state(tmp_path, tiny_bert, synthetic_silo):
    # a federation's adapter folder holds the shared part only; the merchant's prior is in its state folder
    from common.silo import STATE_DIR
    from common.storage import LOCAL_FILE

    adapter = saved_adapter(tmp_path / "adapter", tiny_bert, synthetic_silo)
    (adapter / LOCAL_FILE).unlink()
    local = SiloRecommender.load(adapter, synthetic_silo).model
    assert not local.has_prior
    prior = np.linspace(0, 3, len(local.item_ids), dtype=np.float32)
    local.set_prior(prior)
    (synthetic_silo / STATE_DIR).mkdir()
    local.save_local(synthetic_silo / STATE_DIR / LOCAL_FILE)
    served = SiloRecommender.load(adapter, synthetic_silo)
    assert np.allclose(served.model.prior.numpy(), prior)
    (tmp_path / "elsewhere").mkdir()
    assert not SiloRecommender.load(adapter, synthetic_silo, state_dir=tmp_path / "elsewhere").model.has_prior
    # an adapter with local state of its own (a central run's) keeps it, whatever an old state folder holds
    own = np.linspace(3, 0, len(local.item_ids), dtype=np.float32)
    local.set_prior(own)
    local.save_local(adapter / LOCAL_FILE)
    assert np.allclose(SiloRecommender.load(adapter, synthetic_silo).model.prior.numpy(), own)
