"""Leave-one-out split and candidate masking, as docs/eval.md defines them.

Each user's interactions are ordered by timestamp (a stable sort, so ties keep
file order); the last is the test target, the one before it the validation
target, the rest the training history. Users with fewer than three
interactions train on all of them and are not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_EVAL_INTERACTIONS = 3


@dataclass(frozen=True)
class EvalCase:
    """One prediction to score: `history` (catalog indices, oldest first) → `target`."""

    user_id: str
    history: np.ndarray
    target: int

    def masked_items(self) -> np.ndarray:
        """Catalog indices removed from the candidates: the history, but never the target itself.

        A repeat purchase of a history item stays rankable; otherwise its rank
        would be undefined.
        """
        items = np.unique(self.history)
        return items[items != self.target]


@dataclass(frozen=True)
class Split:
    """Per-user training histories and the validation and test cases of one silo."""

    user_ids: list[str]
    train: list[np.ndarray]  # per user, oldest first
    valid: list[EvalCase]
    test: list[EvalCase]
    n_items: int

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def user_sequences(interactions: pd.DataFrame) -> tuple[list[str], list[np.ndarray]]:
    """Each user's catalog indices in time order (ties in file order); users in order of first appearance."""
    codes, user_ids = pd.factorize(interactions["user_id"], sort=False)
    timestamps = interactions["timestamp"].to_numpy(dtype=np.int64)
    by_time = np.argsort(timestamps, kind="stable")
    order = by_time[np.argsort(codes[by_time], kind="stable")]
    items = interactions["item"].to_numpy(dtype=np.int64)[order]
    bounds = np.cumsum(np.bincount(codes, minlength=len(user_ids)))[:-1]
    return [str(u) for u in user_ids], np.split(items, bounds)


def leave_one_out(interactions: pd.DataFrame, n_items: int) -> Split:
    """Split a validated interaction frame (a Silo's) into train / validation / test."""
    user_ids, sequences = user_sequences(interactions)
    train, valid, test = [], [], []
    for user_id, seq in zip(user_ids, sequences):
        if len(seq) < MIN_EVAL_INTERACTIONS:
            train.append(seq)
            continue
        train.append(seq[:-2])
        valid.append(EvalCase(user_id, seq[:-2], int(seq[-2])))
        test.append(EvalCase(user_id, seq[:-1], int(seq[-1])))
    return Split(user_ids=user_ids, train=train, valid=valid, test=test, n_items=n_items)
