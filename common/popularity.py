"""A silo's item popularity, released once under user-level DP, as a fixed prior on the scores.

The text towers cannot tell a blockbuster from an obscure title: an item's
text says little of its popularity. Per-item parameters learned by DP-SGD on
a silo of a hundred users are mostly noise, because every step pays for them
again. One Gaussian release of the item counts is far cheaper:

- each user adds 1/√|S| to each of the |S| distinct items of their training
  history, so one user's whole contribution has L2 norm exactly 1 (the
  sensitivity under adding or removing a user);
- each count gets N(0, σ²) noise, which is the Gaussian mechanism, composed by
  the accountant like one DP-SGD step at sample rate 1 and noise multiplier σ
  (`accountant_entry`);
- the prior log(1 + max(count, 0)) is post-processing of the release.

The prior is per item, so the model never shares it: only the scalar weight
it enters the score with (`Calibration.prior_weight`) is trained and
shared. Everything trained after the release may depend on it: DP composes
adaptively. In a federation a merchant may also share the released counts
themselves, keyed by a hash of each item's text (`text_keys`), to be summed
with the other merchants' (`pool_tables`): post-processing of the release,
so it costs no further ε, and it gives a merchant of a few dozen users the
popularity seen by all merchants' users (a merchant's own counts are mostly
noise at that size).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence

import numpy as np


def item_counts(histories: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Each user's distinct items, weighted 1/√(how many): per-user L2 norm exactly 1."""
    counts = np.zeros(n_items, dtype=np.float64)
    for history in histories:
        items = np.unique(np.asarray(history, dtype=np.int64))
        if len(items):
            counts[items] += 1.0 / np.sqrt(len(items))
    return counts


def release_counts(
    histories: Sequence[np.ndarray], n_items: int, noise_multiplier: float, *, seed: int | None = None
) -> np.ndarray:
    """The counts plus N(0, σ²) per item; σ = 0 returns them exact.

    The noise is drawn from OS entropy unless `seed` is given: whoever knows
    the seed can subtract it, so a seed is for experiments only.
    """
    return gaussian_release(item_counts(histories, n_items), noise_multiplier, seed=seed)


def gaussian_release(values: np.ndarray, noise_multiplier: float, *, seed: int | None = None) -> np.ndarray:
    """`values` (of L2 sensitivity 1) plus N(0, σ²) each, from OS entropy unless seeded; σ = 0 returns them exact."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be ≥ 0, not {noise_multiplier}")
    if noise_multiplier == 0:
        return values
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
    return values + rng.normal(0.0, noise_multiplier, size=values.shape)


def prior_from_counts(counts: np.ndarray) -> np.ndarray:
    """log(1 + max(count, 0)): what the score adds, times the shared prior weight."""
    return np.log1p(np.clip(counts, 0.0, None)).astype(np.float32)


def accountant_entry(noise_multiplier: float) -> tuple[float, float, int]:
    """The release as an accountant sees it: (noise multiplier, sample rate, steps)."""
    return (float(noise_multiplier), 1.0, 1)


def release_prior(
    histories: Sequence[np.ndarray], n_items: int, noise_multiplier: float, *, seed: int | None = None
) -> np.ndarray:
    """The released counts of `histories` (training histories only; catalog order) under noise `noise_multiplier`.

    The caller records `accountant_entry(noise_multiplier)` before the counts,
    or the prior they give (`prior_from_counts`), are kept or anything trained
    with them leaves the silo.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"a released prior needs noise: noise_multiplier must be > 0, not {noise_multiplier}")
    return release_counts(histories, n_items, noise_multiplier, seed=seed)


# --- pooling across merchants ------------------------------------------------------
#
# Item ids do not line up across merchants; item text does. A merchant may share its
# released counts keyed by a hash of each item's text: that is post-processing of the
# release (no further ε), and the coordinator sums the tables it receives. Each merchant
# then scores its items with the pooled counts of their texts, an estimate from every
# merchant's users whose noise grows only as the square root of the merchants summed.

KEY_BYTES = 8  # of SHA-256: a collision among 10⁶ item texts has probability about 3·10⁻⁸


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """One uint64 per item: the first 8 bytes of SHA-256 of the item's text (the text its vector encodes)."""
    return np.array(
        [int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:KEY_BYTES], "big") for t in texts], dtype=np.uint64
    )


def check_table(keys: np.ndarray, counts: np.ndarray, *, max_items: int = 10_000_000) -> None:
    """ValueError unless (keys, counts) is a popularity table: uint64 keys, as many finite float counts."""
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise ValueError(f"keys must be a 1-D uint64 array, not {keys.dtype} of shape {keys.shape}")
    if counts.dtype not in (np.float32, np.float64) or counts.shape != keys.shape:
        raise ValueError(f"counts must be {len(keys)} floats, one per key; got {counts.dtype} of shape {counts.shape}")
    if len(keys) > max_items:
        raise ValueError(f"{len(keys)} items is more than the {max_items} a table may hold")
    if not np.isfinite(counts).all():
        raise ValueError("counts must be finite")


def read_table(table: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) of a table as it travels ({"keys", "counts"}); ValueError unless it is one."""
    if set(table) != {"keys", "counts"}:
        raise ValueError(f"a popularity table holds keys and counts, not {sorted(table)}")
    check_table(table["keys"], table["counts"])
    return table["keys"], table["counts"]


def prior_of(table: Mapping[str, np.ndarray], item_keys: np.ndarray) -> np.ndarray:
    """The prior of the items named by `item_keys` from a table's counts (0 counts where it names none)."""
    return prior_from_counts(look_up(pool_tables([read_table(table)]), item_keys))


def pool_tables(tables: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The tables summed by key: (distinct keys, sorted; their summed counts in float64)."""
    if not tables:
        return np.zeros(0, np.uint64), np.zeros(0, np.float64)
    keys = np.concatenate([k for k, _ in tables])
    counts = np.concatenate([np.asarray(c, np.float64) for _, c in tables])
    distinct, where = np.unique(keys, return_inverse=True)
    return distinct, np.bincount(where, weights=counts, minlength=len(distinct))


def key_slots(item_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each item's position among the sorted, distinct `keys` (-1 where its key is not there)."""
    if not len(keys):
        return np.full(len(item_keys), -1, np.int64)
    at = np.minimum(np.searchsorted(keys, item_keys), len(keys) - 1)
    return np.where(keys[at] == item_keys, at, -1).astype(np.int64)


def counts_over_keys(histories: Sequence[np.ndarray], item_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`item_counts` over item-text keys: each user's distinct keys, 1/√(how many) each, so still L2 norm 1 a user.

    `item_keys` names each catalog item, `keys` (sorted, distinct) the
    coordinates; two items of one text are one coordinate, counted once a user.
    """
    slots = key_slots(item_keys, keys)
    mapped = [slots[np.asarray(h, dtype=np.int64)] for h in histories]
    return item_counts([m[m >= 0] for m in mapped], len(keys))


def look_up(pooled: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
    """The pooled counts of `keys` (0 for a key no table held)."""
    distinct, sums = pooled
    if not len(distinct):
        return np.zeros(len(keys), np.float64)
    at = np.minimum(np.searchsorted(distinct, keys), len(distinct) - 1)
    return np.where(distinct[at] == keys, sums[at], 0.0)
