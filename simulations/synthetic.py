"""Small seeded silos with planted structure, for tests and quick experiments.

Every item belongs to one category and its title is drawn from that
category's vocabulary; every user has a favourite category and mostly
interacts with its items, in a random order. Within a category items are about
equally popular by default, so popularity alone (MostPop) does little better
than chance, while a model that reads the history's text can find the
category. With `popularity` > 0 some items of each category sell far more
than others, which only the interactions reveal: a model whose untrained user
tower already finds the category can then still show that training taught it
something.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.silo import write_silo

CATEGORIES: dict[str, tuple[str, ...]] = {
    "kitchen": ("pan", "knife", "kettle", "spoon", "whisk", "skillet", "grater", "ladle"),
    "garden": ("rake", "hose", "shovel", "seeds", "planter", "trowel", "mower", "shears"),
    "music": ("guitar", "piano", "drum", "violin", "flute", "trumpet", "cello", "banjo"),
    "sports": ("ball", "racket", "helmet", "skates", "glove", "bat", "net", "jersey"),
    "books": ("novel", "poems", "atlas", "diary", "memoir", "thriller", "cookbook", "comic"),
    "toys": ("puzzle", "doll", "kite", "robot", "blocks", "yoyo", "marbles", "train"),
}
ADJECTIVES: tuple[str, ...] = ("red", "small", "classic", "deluxe", "compact", "vintage", "bright", "sturdy")
BRANDS: tuple[str, ...] = ("acme", "zenith", "nova", "orbit")


def vocabulary() -> list[str]:
    """Every word a synthetic silo's item text can contain (for building a tiny tokenizer)."""
    words = set(ADJECTIVES) | set(BRANDS) | set(CATEGORIES) | set("0123456789")
    for nouns in CATEGORIES.values():
        words |= set(nouns)
    return sorted(words)


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 60
    items: int = 48
    categories: int = 4
    min_interactions: int = 6
    max_interactions: int = 12
    favourite_share: float = 0.9  # chance that an interaction is in the user's favourite category
    # Zipf exponent of item popularity within a pool (0: all equally popular). With a skew the
    # text finds the category, and only the interactions tell which of its items sell best.
    popularity: float = 0.0
    # False: items carry no category field, so only their nouns (and the interactions) tell which
    # items belong together, and an untrained text tower finds little.
    label_categories: bool = True
    seed: int = 0


def make_synthetic_silo(out: Path, spec: SyntheticSpec = SyntheticSpec(), *, fmt: str = "csv") -> Path:
    """Write a planted-structure silo (items, interactions, users) to `out` and return `out`."""
    if not 1 <= spec.categories <= len(CATEGORIES):
        raise ValueError(f"categories must be between 1 and {len(CATEGORIES)}")
    rng = np.random.default_rng(spec.seed)
    cat_names = list(CATEGORIES)[: spec.categories]
    item_cat = np.arange(spec.items) % spec.categories
    titles = []
    for i, c in enumerate(item_cat):
        nouns = CATEGORIES[cat_names[c]]
        titles.append(f"{rng.choice(ADJECTIVES)} {nouns[(i // spec.categories) % len(nouns)]} {i}")
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(spec.items)],
            "title": titles,
            "category": [cat_names[c] if spec.label_categories else "" for c in item_cat],
            "brand": rng.choice(BRANDS, size=spec.items),
            "description": "",
        }
    )
    by_cat = [np.flatnonzero(item_cat == c) for c in range(spec.categories)]
    # a random popularity order (drawn only with a skew, so that silos without one stay as they were)
    appeal = 1.0 / (1.0 + rng.permutation(spec.items)) ** spec.popularity if spec.popularity else None

    def draw(pool: np.ndarray) -> int:
        if appeal is None:
            return int(rng.choice(pool))
        return int(rng.choice(pool, p=appeal[pool] / appeal[pool].sum()))

    rows = []
    t0 = 1_700_000_000
    for u in range(spec.users):
        fav = int(rng.integers(spec.categories))
        n = int(rng.integers(spec.min_interactions, spec.max_interactions + 1))
        for k in range(n):
            pool = by_cat[fav] if rng.random() < spec.favourite_share else np.arange(spec.items)
            rows.append((f"u{u}", f"i{draw(pool)}", t0 + 3600 * k + int(rng.integers(60))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["timestamp"] = inter["timestamp"] * 1_000_000_000  # write_silo takes nanoseconds
    users = pd.DataFrame(
        {"user_id": [f"u{u}" for u in range(spec.users)], "zip_code": [f"{u % 10}{u:04d}" for u in range(spec.users)]}
    )
    if fmt == "csv":
        write_silo(out, items, inter, users)
    elif fmt == "parquet":
        out.mkdir(parents=True, exist_ok=True)
        items.to_parquet(out / "items.parquet", index=False)
        inter.assign(timestamp=inter["timestamp"] // 1_000_000_000).to_parquet(
            out / "interactions.parquet", index=False
        )
        users.to_parquet(out / "users.parquet", index=False)
    else:
        raise ValueError(f"fmt must be 'csv' or 'parquet', not {fmt!r}")
    return out
