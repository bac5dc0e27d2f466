from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simulations.search_eval import BM25, dropped_word_queries, genre_year_queries, recall_at


def test_bm25_matches_the_formula_worked_by_hand():
    bm25 = BM25(["red apple", "green apple apple pie", "plum"], k1=1.2, b=0.75)
    scores = bm25.scores("Apple")
    assert scores[2] == 0
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # "apple" is in 2 of 3 documents
    mean = (2 + 4 + 1) / 3
    expected_0 = idf * 1 * 2.2 / (1 + 1.2 * (1 - 0.75 + 0.75 * 2 / mean))
    expected_1 = idf * 2 * 2.2 / (2 + 1.2 * (1 - 0.75 + 0.75 * 4 / mean))
    assert scores[0] == pytest.approx(expected_0) and scores[1] == pytest.approx(expected_1)


def test_title_queries_drop_one_word_and_the_year():
    queries = dropped_word_queries(["Toy Story (1995)", "Heat (1995)", "The Big Lebowski (1998)"], seed=3)
    assert [a.tolist() for a in queries.answers] == [[0], [2]]  # a one-word title makes no query
    toy, big = queries.texts
    assert toy in ("Toy", "Story") and len(big.split()) == 2 and set(big.split()) < {"The", "Big", "Lebowski"}
    assert "1995" not in toy


def test_genre_year_queries_are_answered_by_every_item_of_both():
    items = pd.DataFrame(
        {"title": ["A (1995)", "B (1995)", "C (1996)", "D"], "category": ["Comedy|Drama", "Comedy", "Comedy", "Comedy"]}
    )
    queries = genre_year_queries(items)
    got = dict(zip(queries.texts, (a.tolist() for a in queries.answers)))
    assert got == {"Comedy 1995": [0, 1], "Comedy 1996": [2], "Drama 1995": [0]}


def test_recall_counts_answers_in_the_top_k_and_breaks_ties_at_random():
    scores = np.array([[0.9, 0.1, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert recall_at(scores, [np.array([2]), np.array([0, 1])], k=2) == pytest.approx((1 + 0.5) / 2)
    # all scores tied: the answer at index 0 is found about k/n of the time, not always
    ties = np.zeros((2000, 100))
    assert recall_at(ties, [np.array([0])] * 2000, k=10) == pytest.approx(0.1, abs=0.03)


def test_search_eval_prints_both_rankers(tiny_bert, synthetic_silo, tmp_path):
    from simulations.cli import main as sim

    done = CliRunner().invoke(
        sim, ["search-eval", "--data", str(synthetic_silo), "--base-model", str(tiny_bert), "--cache", str(tmp_path)]
    )
    assert done.exit_code == 0, done.output
    title_row = next(line for line in done.output.splitlines() if line.startswith("title, one word dropped"))
    numbers = [float(x) for x in title_row.split()[4:7] if x.replace(".", "").replace(",", "").isdigit()]
    assert len(numbers) == 3 and numbers[0] == 48 and all(0 <= r <= 1 for r in numbers[1:])
