from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synthetic import SyntheticSpec, make_synthetic_silo


@pytest.fixture
def synthetic_silo(tmp_path: Path) -> Path:
    """A small planted-structure silo (60 users, 48 items, 4 categories)."""
    return make_synthetic_silo(tmp_path / "shop", SyntheticSpec(seed=0))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT (2 layers, hidden 32) with a word-level vocabulary of the synthetic silos."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from simulations.synthetic import vocabulary

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ";", ".", ",", "(", ")"] + vocabulary()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(folder)
    import torch

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder
