from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file

from common.encoder import load_encoder
from common.model_config import ModelConfig
from common.recommender import Recommender, build_recommender
from common.silo import load_silo
from common.storage import CALIBRATION_FILE
from common.text import item_texts


def catalog(path):
    s = load_silo(path)
    return list(s.items["item_id"]), item_texts(s.items), list(s.items["title"])


def test_item_vectors_are_unit_and_cached_one_per_text(tmp_path, tiny_bert, synthetic_silo):
    from common.encoder import read_cache

    ids, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert))
    m = build_recommender(cfg, ids, texts, cache_dir=tmp_path / "cache")
    norms = m.item_vectors.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and len(read_cache(files[0])) == len(set(texts))
    # poison the cache file: a rebuild over the same catalog must read it, not recompute
    from safetensors.torch import save_file

    tensors = load_file(files[0])
    save_file({"keys": tensors["keys"], "vectors": torch.zeros_like(tensors["vectors"])}, str(files[0]))
    again = build_recommender(cfg, ids, texts, cache_dir=tmp_path / "cache")
    assert again.item_vectors.abs().sum() == 0
    # a new text is encoded alone and joins the same file; the others are still read from it
    changed = build_recommender(cfg, ids, texts[:-1] + ["something else"], cache_dir=tmp_path / "cache")
    assert changed.item_vectors[:-1].abs().sum() == 0 and changed.item_vectors[-1].norm() > 0.99
    assert len(list((tmp_path / "cache").iterdir())) == 1 and len(read_cache(files[0])) == len(set(texts)) + 1


def test_history_keeps_the_most_recent_items_that_fit_the_budget(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    m = build_recommender(ModelConfig(base_model=str(tiny_bert), max_tokens=40), ids, texts)
    lengths = [len(t) for t in m.item_tokens]
    history = np.array([0, 1, 2, 3, 4, 5])
    batch = m.history_inputs([history, np.array([7])])
    seg, pos, tokens = batch["segments"][0], batch["position_ids"][0], batch["input_ids"][0]
    k = int(seg.max())
    kept = history[-k:]  # oldest first, most recent last
    assert sum(lengths[int(i)] for i in kept) <= 40 < sum(lengths[int(i)] for i in history[-k - 1 :])
    for j, item in enumerate(kept, start=1):
        span = seg == j
        assert tokens[span].tolist() == m.item_tokens[int(item)]
        assert pos[span].tolist() == list(range(lengths[int(item)]))
    assert (batch["segments"][1] > 0).sum() == lengths[7]  # the short row is padded with segment 0
    # a single item longer than the budget is cut, keeping [CLS] … [SEP]
    tight = build_recommender(ModelConfig(base_model=str(tiny_bert), max_tokens=4), ids, texts)
    row = tight.history_inputs([np.array([3])])["input_ids"][0].tolist()
    assert len(row) == 4 and row[0] == tight.tokenizer.cls_token_id and row[-1] == tight.tokenizer.sep_token_id


def test_fresh_user_vector_is_the_recency_weighted_mean_of_item_vectors(tiny_bert, synthetic_silo):
    # LoRA B starts at zero, so each item segment encodes exactly as the item tower read that item
    ids, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert), recency=0.5)
    m = build_recommender(cfg, ids, texts)
    histories = [np.array([4, 9, 2]), np.array([11])]
    with torch.no_grad():
        inputs = m.history_inputs(histories)
        inputs.pop("recent")  # the co-occurrence score's input, not the encoder's
        ours = m.encode_users(**inputs)
    expected = []
    for h in histories:
        weights = torch.tensor([0.5 ** (len(h) - 1 - j) for j in range(len(h))])
        expected.append(
            torch.nn.functional.normalize((weights[:, None] * m.item_vectors[torch.as_tensor(h)]).sum(0), dim=0)
        )
    assert torch.allclose(ours, torch.stack(expected), atol=1e-5)


def test_ffa_trains_and_shares_only_b(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    m = build_recommender(ModelConfig(base_model=str(tiny_bert), ffa=True, local_head="none"), ids, texts)
    names = m.trainable_names()
    assert names and all("lora_B" in n for n in names if m.kind_of(n) == "adapter")
    assert all("lora_B" in k for k in m.adapter_state())
    full = build_recommender(ModelConfig(base_model=str(tiny_bert), local_head="none"), ids, texts)
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
    batch = m.history_inputs([np.arange(5), np.array([7])])
    with torch.no_grad():
        expected = m(**batch)
        # the adapter as plain peft loads it (base encoder + PeftModel.from_pretrained) is the user tower
        tok, enc = load_encoder(str(tiny_bert))
        peft_model = PeftModel.from_pretrained(enc, str(tmp_path / "adapter")).eval()
        tower = Recommender(peft_model, tok, m.item_vectors, cfg, ids, m.item_tokens)
        u = tower.encode_users(batch["input_ids"], batch["segments"], batch["position_ids"])
        head = m.local_state()
        calibration = load_file(tmp_path / "adapter" / CALIBRATION_FILE)
        scale, offset = (
            calibration["calibration.log_scale.weight"].exp(),
            calibration["calibration.offset.weight"].reshape(-1),
        )
        plain = (u * scale + offset) @ m.item_vectors.T + u @ head["weight"].T + head["bias"]
        assert torch.allclose(plain, expected, atol=1e-4)
        # and silorec's own loader
        loaded = build_recommender(cfg, ids, texts, adapter_dir=tmp_path / "adapter")
        assert torch.allclose(loaded(**batch), expected, atol=1e-4)


def test_head_aligns_by_item_id_across_catalogs(tiny_bert, synthetic_silo):
    ids, texts, _ = catalog(synthetic_silo)
    state = {"weight": torch.randn(len(ids), 32), "bias": torch.arange(len(ids), dtype=torch.float32)}
    reordered = build_recommender(ModelConfig(base_model=str(tiny_bert)), ids[::-1] + ["new"], texts[::-1] + ["new"])
    reordered.load_local_state(state, ids)
    bias = reordered.head.bias.weight[:, 0]
    assert bias[0] == len(ids) - 1 and bias[1] == len(ids) - 2 and bias[-1] == 0
    assert np.allclose(reordered.head.weights.weight[1].detach(), state["weight"][len(ids) - 2])
    # an item the popularity release never covered gets the released items' median prior, not the bottom
    released = torch.linspace(0, 4, len(ids))
    reordered.load_local_state({"prior": released}, ids)
    assert reordered.prior[-1] == released.median() and torch.equal(reordered.prior[:-1], released.flip(0))
    reordered.add_items(["newer"], ["newer"])
    assert reordered.prior[-1] == reordered.prior[:-1].median()


def test_many_writers_can_fill_the_same_item_cache_at_once(tmp_path, tiny_bert, synthetic_silo):
    # simulation actors of several merchants share one cache; a fixed temporary name raced here
    from concurrent.futures import ThreadPoolExecutor

    from common.encoder import cached_item_vectors

    _, texts, _ = catalog(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert))
    tok, enc = load_encoder(str(tiny_bert))

    def fill(_):
        return cached_item_vectors(enc, tok, texts, cfg, device=torch.device("cpu"), cache_dir=tmp_path / "cache")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(fill, range(12)))
    assert all(torch.allclose(r, results[0]) for r in results)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".safetensors"]


def test_a_damaged_or_mismatched_adapter_is_one_clear_error_and_never_a_download(tmp_path, tiny_bert, synthetic_silo):
    import json
    import shutil

    from click.testing import CliRunner

    from client.cli import main as client

    s = load_silo(synthetic_silo)
    cfg = ModelConfig(base_model=str(tiny_bert), local_head="none")
    build_recommender(cfg, list(s.items["item_id"]), item_texts(s.items)).save(tmp_path / "good")
    other = tmp_path / "rank4"
    build_recommender(
        ModelConfig(base_model=str(tiny_bert), local_head="none", lora_r=4),
        list(s.items["item_id"]),
        item_texts(s.items),
    ).save(other)

    def damaged(name, how):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        how(folder)
        return folder

    cases = {
        "adapter_config.json: unreadable": damaged(
            "config", lambda f: (f / "adapter_config.json").write_text("{ half")
        ),
        "silorec_model.json: unreadable": damaged("model", lambda f: (f / "silorec_model.json").write_text("[1")),
        "adapter_model.safetensors: unreadable tensors": damaged(
            "truncated",
            lambda f: (f / "adapter_model.safetensors").write_bytes(
                (f / "adapter_model.safetensors").read_bytes()[:50]
            ),
        ),
        "adapter_model.safetensors is missing": damaged(
            "missing", lambda f: (f / "adapter_model.safetensors").unlink()
        ),
        "has shape": damaged(
            "mixed", lambda f: shutil.copy(other / "adapter_model.safetensors", f / "adapter_model.safetensors")
        ),
        "r is 4 but": damaged("rank", lambda f: shutil.copy(other / "adapter_config.json", f / "adapter_config.json")),
        "not a silorec model config": damaged(
            "fields", lambda f: (f / "silorec_model.json").write_text(json.dumps({"lora_r": "eight", "recency": 9}))
        ),
    }
    user = str(s.interactions["user_id"].iloc[0])
    for message, folder in cases.items():
        for args in (["recommend", "--user", user], ["evaluate"]):
            done = CliRunner().invoke(
                client, [args[0], "--adapter", str(folder), "--data", str(synthetic_silo), *args[1:]]
            )
            assert done.exit_code == 2 and message in done.output, (message, args, done.output)
            assert done.output.startswith("error: ") and len(done.output.strip().splitlines()) == 1
    done = CliRunner().invoke(
        client, ["recommend", "--adapter", str(tmp_path / "good"), "--data", str(synthetic_silo), "--user", user]
    )
    assert done.exit_code == 0, done.output
