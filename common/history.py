"""How a user's history becomes one input sequence for the user tower, and its token states one user vector.

The history is the texts of the most recent items that fit the token budget.
Each item's text is its own segment of one sequence: attention stays inside a
segment and positions restart, so each item is read exactly as the item
tower read it. The segments are mean-pooled and averaged with weights
decaying by `recency` per step back in time, then normalised. With the
adapter at zero, u is therefore exactly the recency-weighted mean of the
history's item vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def pack_histories(
    histories: Sequence[np.ndarray],
    item_tokens: Sequence[list[int]],
    *,
    budget: int,
    empty: list[int],
    pad: int,
    recent: int,
) -> dict[str, torch.Tensor]:
    """The encoder's input for each history (catalog indices, oldest first): the most recent items' texts that fit
    `budget` tokens.

    Returns input ids, `segments` (1…K for the items, oldest first; 0 for
    padding) and position ids that restart at each item. The most recent item
    is always there, cut to the budget if it alone exceeds it; a user with no
    history reads the `empty` text. With them, `recent`: the catalog indices
    of the last `recent` items, newest first (-1 for padding).
    """
    rows: list[list[list[int]]] = []
    for history in histories:
        picked: list[list[int]] = []
        used = 0
        for item in reversed(np.asarray(history).tolist()):
            tokens = item_tokens[int(item)]
            if used + len(tokens) > budget:
                if not picked:
                    picked.append(tokens[: budget - 1] + tokens[-1:])
                break
            picked.append(tokens)
            used += len(tokens)
        rows.append(picked[::-1] or [list(empty)])
    width = max(sum(len(t) for t in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    segments = torch.zeros_like(input_ids)
    positions = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        at = 0
        for k, tokens in enumerate(row, start=1):
            n = len(tokens)
            input_ids[r, at : at + n] = torch.as_tensor(tokens)
            segments[r, at : at + n] = k
            positions[r, at : at + n] = torch.arange(n)
            at += n
    last = torch.full((len(rows), recent), -1, dtype=torch.long)
    for r, history in enumerate(histories):
        newest = torch.as_tensor(np.asarray(history, dtype=np.int64)[::-1][:recent].copy())
        last[r, : len(newest)] = newest
    return {"input_ids": input_ids, "segments": segments, "position_ids": positions, "recent": last}


def segment_mask(segments: torch.Tensor, *, additive: bool) -> torch.Tensor:
    """Attention within each segment only (padding attends to itself): booleans, or 0/−∞ for eager attention."""
    width = segments.shape[1]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    mask = (same | torch.eye(width, dtype=torch.bool, device=segments.device))[:, None]
    if additive:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def pool_segments(hidden: torch.Tensor, segments: torch.Tensor, recency: float) -> torch.Tensor:
    """u: each segment's token states mean-pooled and normalised, then their recency-weighted mean, normalised."""
    k = int(segments.max())
    member = F.one_hot(segments, k + 1)[..., 1:].to(hidden.dtype)  # users × tokens × items
    sums = torch.einsum("btk,bth->bkh", member, hidden)
    items = F.normalize((sums / member.sum(1).clamp(min=1.0)[..., None]).float(), dim=-1)
    age = (segments.max(1).values[:, None] - torch.arange(1, k + 1, device=segments.device)).float()
    weights = torch.where(age >= 0, recency**age, torch.zeros_like(age))
    return F.normalize((weights[..., None] * items).sum(1), dim=-1)
