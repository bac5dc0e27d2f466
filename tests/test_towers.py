from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel

from common.silo import load_silo
from common.text import item_texts
from common.towers import ModelConfig, build_recommender, load_encoder, mean_pool, tokenize


def catalog(path):
    s = load_silo(path)
    return list(s.items["item_id"]), item_texts(s.items), list(s.items["title"])


def test_item_vectors_are_unit_and_cached(tmp_path, tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert))
    m = build_recommender(cfg, ids, texts, cache_dir=tmp_path / "cache")
    norms = m.item_vectors.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1
    # poison the cache file: a rebuild over the same catalog must read it, not recompute
    from safetensors.torch import save_file

    save_file({"vectors": torch.zeros_like(m.item_vectors)}, str(files[0]))
    again = build_recommender(cfg, ids, texts, cache_dir=tmp_path / "cache")
    assert again.item_vectors.abs().sum() == 0
    # a changed catalog text is a different key
    changed = build_recommender(cfg, ids, texts[:-1] + ["something else"], cache_dir=tmp_path / "cache")
    assert changed.item_vectors.abs().sum() > 0 and len(list((tmp_path / "cache").iterdir())) == 2


def test_user_history_is_cut_from_the_left(tiny_bert):
    tok, _ = load_encoder(str(tiny_bert))
    out = tokenize(tok, ["pan kettle " * 30 + "guitar"], 8, keep="end")
    words = tok.convert_ids_to_tokens(out["input_ids"][0])
    assert words[0] == "[CLS]" and words[-2:] == ["guitar", "[SEP]"]


def test_fresh_adapter_scores_equal_frozen_text_scores(tiny_bert, synthetic_silo):
    # LoRA B starts at zero and the head at zero, so the untrained user tower is the base encoder
    ids, texts, titles = catalog(synthetic_silo)
    m = build_recommender(ModelConfig(base_model=str(tiny_bert)), ids, texts)
    tok, enc = load_encoder(str(tiny_bert))
    batch = tokenize(tok, titles[:3], 128, keep="end")
    with torch.no_grad():
        base = mean_pool(enc(**batch).last_hidden_state, batch["attention_mask"])
        ours = m.encode_users(**batch)
    assert torch.allclose(base, ours, atol=1e-5)


def test_ffa_trains_and_shares_only_b(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    m = build_recommender(ModelConfig(base_model=str(tiny_bert), ffa=True, local_head=False), ids, texts)
    names = m.trainable_names()
    assert names and all("lora_B" in n for n in names)
    assert all("lora_B" in k for k in m.adapter_state())
    full = build_recommender(ModelConfig(base_model=str(tiny_bert), local_head=False), ids, texts)
    assert len(full.adapter_state()) == 2 * len(m.adapter_state())


def test_same_seed_same_ffa_a(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert), ffa=True, seed=7)
    a = build_recommender(cfg, ids, texts)
    b = build_recommender(cfg, ids, texts)
    a_state = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    for n, p in b.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p, a_state[n])


def test_adapter_state_round_trip(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert))
    a = build_recommender(cfg, ids, texts)
    state = {k: torch.randn_like(v) for k, v in a.adapter_state().items()}
    a.load_adapter_state(state)
    assert all(torch.equal(a.adapter_state()[k], v) for k, v in state.items())


def test_saved_adapter_loads_with_peft_and_gives_the_same_scores(tmp_path, tiny_bert, synthetic_silo):
    ids, texts, titles = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert))
    m = build_recommender(cfg, ids, texts)
    with torch.no_grad():  # make the adapter and head non-trivial
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    m.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    batch = m.tokenize_histories([" ; ".join(titles[:5]), titles[7]])
    with torch.no_grad():
        expected = m(**batch)
        # plain peft, no silorec code: base encoder + PeftModel.from_pretrained
        _, enc = load_encoder(str(tiny_bert))
        peft_model = PeftModel.from_pretrained(enc, str(tmp_path / "adapter")).eval()
        u = mean_pool(peft_model(**batch).last_hidden_state, batch["attention_mask"])
        head = m.head_state()
        plain = u @ m.item_vectors.T / cfg.temperature + u @ head["weight"].T + head["bias"]
        assert torch.allclose(plain, expected, atol=1e-4)
        # and silorec's own loader
        loaded = build_recommender(cfg, ids, texts, adapter_dir=tmp_path / "adapter")
        assert torch.allclose(loaded(**batch), expected, atol=1e-4)


def test_head_aligns_by_item_id_across_catalogs(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    m = build_recommender(ModelConfig(base_model=str(tiny_bert)), ids, texts)
    state = {"weight": torch.randn(len(ids), 32), "bias": torch.arange(len(ids), dtype=torch.float32)}
    reordered = build_recommender(ModelConfig(base_model=str(tiny_bert)), ids[::-1] + ["new"], texts[::-1] + ["new"])
    reordered.load_head_state(state, ids)
    assert reordered.head.bias[0] == len(ids) - 1 and reordered.head.bias[-1] == 0
    assert np.allclose(reordered.head.weight[1].detach(), state["weight"][len(ids) - 2])


def test_many_writers_can_fill_the_same_item_cache_at_once(tmp_path, tiny_bert, synthetic_silo):
    # simulation actors of several merchants share one cache; a fixed temporary name raced here
    from concurrent.futures import ThreadPoolExecutor

    from common.towers import cached_item_vectors

    _, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert))
    tok, enc = load_encoder(str(tiny_bert))

    def fill(_):
        return cached_item_vectors(enc, tok, texts, cfg, device=torch.device("cpu"), cache_dir=tmp_path / "cache")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(fill, range(12)))
    assert all(torch.allclose(r, results[0]) for r in results)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".safetensors"]
