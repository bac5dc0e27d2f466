"""How well `search` finds a catalog item from text, on queries whose answer the data itself gives, against BM25.

Two query sets, both made from the items file alone:

- **title, one word dropped**: an item's title without its year, one of its
  words (two or more) dropped at random; the answer is that item. A shopper
  half-remembering a name. recall@10 = share of queries whose item is in the
  top 10.
- **genre + year**: "Comedy 1995" for every (category, year) pair the catalog
  has; the answers are every item of that category and year. recall@10 =
  answers in the top 10 / min(10, answers).

Both rankers read the same item text (`common.text.item_texts`). silorec's is
the item tower (the frozen base encoder, mean-pooled, cosine), which federated
training does not change: the adapter is the user tower's. BM25 is Okapi BM25
(k1 = 1.2, b = 0.75) over lower-cased word tokens.

Both query sets are lexical: their words are the indexed text's own, which
is BM25's home ground. Queries in other words (a synonym, a description of
what the shopper wants) are where an encoder would be expected to lead; this
data has no such queries with known answers. A title shared by several
items counts only its own item as the answer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from common.silo import CATEGORY_SEPARATOR

_WORD = re.compile(r"\w+", re.UNICODE)
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Queries:
    name: str
    texts: list[str]
    answers: list[np.ndarray]  # catalog indices of each query's answers


def dropped_word_queries(titles: Sequence[str], *, seed: int = 0) -> Queries:
    """One query per title of two or more words (year removed): the title with one word dropped."""
    rng = np.random.default_rng(seed)
    texts, answers = [], []
    for i, title in enumerate(titles):
        parts = _YEAR.sub("", str(title)).split()
        if len(parts) < 2:
            continue
        drop = int(rng.integers(len(parts)))
        texts.append(" ".join(p for j, p in enumerate(parts) if j != drop))
        answers.append(np.array([i]))
    return Queries("title, one word dropped", texts, answers)


def genre_year_queries(items: pd.DataFrame) -> Queries:
    """One query per (category, year) the catalog holds, answered by all of its items."""
    years = [m.group(1) if (m := _YEAR.search(str(t))) else "" for t in items["title"]]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (category, year) in enumerate(zip(items["category"], years)):
        for c in str(category).split(CATEGORY_SEPARATOR):
            if c and year and c != "unknown":
                groups.setdefault((c, year), []).append(i)
    keys = sorted(groups)
    return Queries("genre + year", [f"{c} {y}" for c, y in keys], [np.array(groups[k]) for k in keys])


class BM25:
    """Okapi BM25 over a fixed set of documents."""

    def __init__(self, documents: Sequence[str], *, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs = [Counter(words(d)) for d in documents]
        self.lengths = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        self.mean_length = float(self.lengths.mean()) if len(self.docs) else 0.0
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, d in enumerate(self.docs):
            for w, tf in d.items():
                self.postings.setdefault(w, []).append((i, tf))

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.docs))
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.mean_length, 1e-9))
        for w in set(words(query)):
            for i, tf in self.postings.get(w, ()):
                out[i] += self.idf[w] * tf * (self.k1 + 1) / (tf + norm[i])
        return out


def recall_at(scores: np.ndarray, answers: Sequence[np.ndarray], k: int = 10, *, seed: int = 0) -> float:
    """Mean over queries of (answers in the top k) / min(k, answers); ties broken at random, never by catalog order."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for row, answer in zip(scores, answers):
        jitter = rng.random(len(row)) * 1e-9  # BM25 gives many exact ties (0 for every item sharing no word)
        top = np.argsort(-(row + jitter))[:k] if k >= len(row) else np.argpartition(-(row + jitter), k)[:k]
        total += len(np.intersect1d(top, answer)) / min(k, len(answer))
    return total / max(len(answers), 1)


def search_scores(query_vectors: torch.Tensor, item_vectors: torch.Tensor) -> np.ndarray:
    """Cosine of each query with each item (both unit vectors): what `SiloRecommender.search` ranks by."""
    return (query_vectors.float() @ item_vectors.float().T).cpu().numpy()
