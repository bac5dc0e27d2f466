"""Which items follow which in a silo, released once under user-level DP: an item-to-item score.

The text towers and the popularity prior know nothing of which items are
watched together, which is what carries sequential recommenders past MostPop
on MovieLens. DP-SGD cannot learn it at a few hundred users: a per-item
embedding is a row of noise per item. One Gaussian release of the
co-occurrence counts among the catalog's most popular items can:

- the items are the `size` most popular by the already released prior
  (post-processing of that release), so nothing here depends on raw counts;
- each user counts the unordered pairs {i, j} of those items (i ≠ j) that
  appear within `window` steps of each other in their training history, and
  scales their counts to L2 norm 1: one user's whole contribution has norm
  exactly 1 (the sensitivity under adding or removing a user);
- each of the size·(size−1)/2 pair counts gets N(0, σ²) noise, composed by
  the accountant like one DP-SGD step at sample rate 1 (`common.popularity.accountant_entry`);
- the noisy matrix is then projected onto its `rank` largest eigenvalues in
  magnitude, which keeps the structure many users share and drops most of
  the noise (post-processing).

A user is scored by the released rows of their most recent history items
(`common.score.neighbour_scores`). Like the prior, the matrix is per item
and stays in the silo; only the scalar weight it enters the score with is
shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.popularity import gaussian_release

# Chosen on MovieLens-100k validation: 600 items cover most next items, a window of 3 beats the
# whole history, and rank 32 keeps the structure many users share while dropping most noise.
SIZE = 600
WINDOW = 3
RANK = 32


def pair_counts(histories: Sequence[np.ndarray], items: np.ndarray, n_items: int, window: int = WINDOW) -> np.ndarray:
    """The upper triangle (i < j, flattened) of the co-occurrence counts among `items`, each user's scaled to norm 1."""
    size = len(items)
    slot = np.full(n_items, -1)
    slot[items] = np.arange(size)
    upper = np.triu_indices(size, k=1)
    flat = np.full((size, size), -1, dtype=np.int64)
    flat[upper] = np.arange(len(upper[0]))
    counts = np.zeros(len(upper[0]), dtype=np.float64)
    for history in histories:
        seq = slot[np.asarray(history, dtype=np.int64)]
        gaps = range(1, min(window, len(seq) - 1) + 1)
        if not gaps:
            continue
        a = np.concatenate([seq[:-d] for d in gaps])
        b = np.concatenate([seq[d:] for d in gaps])
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not keep.any():
            continue
        lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        pairs, mine = np.unique(flat[lo, hi], return_counts=True)
        counts[pairs] += mine / np.linalg.norm(mine)
    return counts


def release_cooccurrence(
    histories: Sequence[np.ndarray],
    items: np.ndarray,
    n_items: int,
    noise_multiplier: float,
    *,
    window: int = WINDOW,
    rank: int = RANK,
    seed: int | None = None,
) -> np.ndarray:
    """The symmetric `len(items)`² matrix of noisy pair counts (zero diagonal), projected to `rank` (0: no projection).

    The noise is drawn from OS entropy unless `seed` is given (experiments only).
    """
    items = np.asarray(items, dtype=np.int64)
    counts = gaussian_release(pair_counts(histories, items, n_items, window), noise_multiplier, seed=seed)
    return project(symmetric(counts, len(items)), rank)


def symmetric(pairs: np.ndarray, size: int) -> np.ndarray:
    """The `size`² symmetric matrix (zero diagonal) of flattened upper-triangle pair counts."""
    matrix = np.zeros((size, size))
    matrix[np.triu_indices(size, k=1)] = pairs
    return matrix + matrix.T


def project(matrix: np.ndarray, rank: int = RANK) -> np.ndarray:
    """`matrix` projected onto its `rank` eigenvalues largest in magnitude (0: as it is), zero diagonal, float32."""
    size = len(matrix)
    if 0 < rank < size:
        values, vectors = np.linalg.eigh(matrix)
        top = np.argsort(-np.abs(values))[:rank]
        matrix = (vectors[:, top] * values[top]) @ vectors[:, top].T
        np.fill_diagonal(matrix, 0.0)
    return matrix.astype(np.float32)


def top_items(prior: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The catalog indices of the `size` items the released prior ranks highest, in catalog order."""
    prior = np.asarray(prior)
    return np.sort(np.argsort(-prior, kind="stable")[: min(size, len(prior))])


def release_top_cooccurrence(
    prior: np.ndarray,
    histories: Sequence[np.ndarray],
    noise_multiplier: float,
    *,
    size: int = SIZE,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The items (`top_items` of the already released `prior`) and their released co-occurrence in `histories`.

    The caller records `accountant_entry(noise_multiplier)` before the matrix
    is kept or anything trained with it leaves the silo.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"a released co-occurrence needs noise: noise_multiplier must be > 0, not {noise_multiplier}")
    if not np.asarray(prior).any():
        raise ValueError(
            "the co-occurrence release picks its items by the released popularity prior: release that first"
        )
    items = top_items(prior, size)
    return items, release_cooccurrence(histories, items, len(prior), noise_multiplier, seed=seed)
