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
    users, sequences, _ = timed_sequences(interactions)
    return users, sequences


def timed_sequences(interactions: pd.DataFrame) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """`user_sequences` and, beside each sequence, its timestamps (int64 nanoseconds)."""
    codes, user_ids = pd.factorize(interactions["user_id"], sort=False)
    timestamps = interactions["timestamp"].to_numpy(dtype=np.int64)
    by_time = np.argsort(timestamps, kind="stable")
    order = by_time[np.argsort(codes[by_time], kind="stable")]
    items = interactions["item"].to_numpy(dtype=np.int64)[order]
    bounds = np.cumsum(np.bincount(codes, minlength=len(user_ids)))[:-1]
    return [str(u) for u in user_ids], np.split(items, bounds), np.split(timestamps[order], bounds)


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


def parse_time(text: str) -> int:
    """A date or time ("1998-03-01", "1998-03-01T12:00", or epoch seconds) as int64 nanoseconds, UTC."""
    text = str(text).strip()
    try:
        if text.lstrip("+-").isdigit():
            return int(text) * 1_000_000_000
        stamp = pd.Timestamp(text)
    except (ValueError, OverflowError):
        raise ValueError(f"not a date or time: {text!r} (use e.g. 1998-03-01 or epoch seconds)") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.value)


def time_split(interactions: pd.DataFrame, n_items: int, *, cutoff: int, train_until: int | None = None) -> Split:
    """Split by time (docs/eval.md, "Time split"): what a model trained up to a date does after it.

    For each user, in time order: the test target is the first interaction
    after `cutoff`, scored from everything up to `cutoff`; the validation
    target is the last interaction up to `cutoff`, scored from what came
    before it; training is what came before the validation target, and only
    up to `train_until` (default: the cutoff), so that a model trained up to
    an earlier date is tested on the same cases as one that went on training.
    """
    train_until = cutoff if train_until is None else train_until
    if train_until > cutoff:
        raise ValueError("train_until must not be after the cutoff: the model would train on the test period")
    user_ids, sequences, times = timed_sequences(interactions)
    train, valid, test = [], [], []
    for user_id, seq, when in zip(user_ids, sequences, times):
        before = seq[when <= cutoff]
        if len(before) >= 2:
            valid.append(EvalCase(user_id, before[:-1], int(before[-1])))
            kept = len(before) - 1
        else:
            kept = len(before)
        train.append(seq[:kept][when[:kept] <= train_until])
        after = seq[when > cutoff]
        if len(before) and len(after):
            test.append(EvalCase(user_id, before, int(after[0])))
    return Split(user_ids=user_ids, train=train, valid=valid, test=test, n_items=n_items)


def split_silo(interactions: pd.DataFrame, n_items: int, *, cutoff: str = "", train_until: str = "") -> Split:
    """Leave-one-out, or with a `cutoff` date the time split (`train_until` only goes with one)."""
    if not cutoff:
        if train_until:
            raise ValueError("train_until needs a cutoff: it is the time split's")
        return leave_one_out(interactions, n_items)
    return time_split(
        interactions, n_items, cutoff=parse_time(cutoff), train_until=parse_time(train_until) if train_until else None
    )
